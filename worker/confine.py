"""Confine the sandbox child: network namespace, unprivileged uid, Landlock, seccomp.

Runs inside the child before any user file is opened. Each step reports whether it took hold;
the child then refuses to run when a protection the operator requires is missing. Linux only;
on other systems every step reports False.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import pwd
import re
import resource
import signal
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

PROTECTIONS = (
    "env_scrubbed",
    "isolated_cwd",
    "private_tmp",
    "rlimits",
    "unprivileged_uid",
    "capabilities_dropped",
    "no_new_privs",
    "seccomp",
    "landlock",
    "netns",
)
# A requirement is a protection name, or "network": a netns or the seccomp socket denial.
REQUIREMENTS = {name: (name,) for name in PROTECTIONS} | {"network": ("netns", "seccomp")}

# Environment names a child never sees, whatever the allow-list says.
SECRET_NAME = re.compile(
    r"^COMPAAS_|(KEY|SECRET|PEPPER|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|AUTH)(_|$)", re.IGNORECASE
)
# (CUDA_*: which GPUs, in which order, a worker's operator gave it; read by a GPU-training child.)
ENV_ALLOWED = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_READ = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV

# System paths the interpreter, numpy, torch and onnxruntime read; nothing else of the host.
SYSTEM_READ = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
)
SYSTEM_WRITE = ("/dev/null",)
# What a child that trains on an NVIDIA GPU reads besides SYSTEM_READ: the driver's /proc and
# /sys entries. It also opens the device nodes (gpu_devices) for reading, writing and ioctl.
GPU_READ = ("/proc/driver/nvidia", "/sys/bus/pci", "/sys/devices", "/sys/module/nvidia")

# Syscalls the child never needs: other processes, kernel state, namespaces. exec stays allowed:
# the engine measures peak memory in a fresh interpreter, Landlock grants the execute right only
# beneath the interpreter's own directories, and every confinement here is inherited.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "swapon",
    "swapoff",
    "reboot",
    "userfaultfd",
    "open_by_handle_at",
    "io_uring_setup",
    "fanotify_init",
    "name_to_handle_at",
)
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The child's environment: an allow-list of the parent's, plus `extra`, never a secret."""
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED}
    env.update(extra)
    return {k: v for k, v in env.items() if not SECRET_NAME.search(k)}


def gpu_devices() -> list[str]:
    """This host's NVIDIA device nodes (/dev/nvidiactl, /dev/nvidia0, /dev/nvidia-uvm, …)."""
    return sorted(glob.glob("/dev/nvidia*"))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def env_scrubbed() -> bool:
    """No COMPAAS_* or secret-looking name in this process's environment."""
    return not any(SECRET_NAME.search(k) for k in os.environ)


def isolated_cwd(cwd: Path) -> bool:
    """Isolated mode, running in an empty directory that is not on sys.path."""
    here = Path.cwd().resolve()
    on_path = any(p in ("", ".") or Path(p).resolve() == here for p in sys.path)
    return bool(sys.flags.isolated) and here == cwd.resolve() and not on_path


def private_tmp(tmp: Path) -> bool:
    """tempfile writes under the child's own temp directory."""
    return Path(tempfile.gettempdir()).resolve() == tmp.resolve()


def die_with_parent() -> None:
    """SIGKILL this process when the process that started it dies (Linux; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def set_rlimits(
    memory_mb: int, cpu_s: int, nproc: int, nofile: int, address_space: bool = True
) -> None:
    """Address space, CPU, core, file size (the memory limit), processes and open files.

    Without `address_space` (a child that uses CUDA, which reserves far more address space
    than it uses) the memory limit is on the data segment and private mappings instead.
    """
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS if address_space else resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (mem, mem))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def rlimits_set() -> bool:
    """Every limit set_rlimits applies is finite here (memory: address space or data)."""
    kinds = ("RLIMIT_CPU", "RLIMIT_CORE", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE")
    limits = [resource.getrlimit(getattr(resource, k))[1] for k in kinds]
    memory = [resource.getrlimit(getattr(resource, k))[1] for k in ("RLIMIT_AS", "RLIMIT_DATA")]
    finite = all(v != resource.RLIM_INFINITY for v in limits)
    return finite and any(v != resource.RLIM_INFINITY for v in memory)


def enter_netns() -> bool:
    """A fresh network namespace (only a down loopback): as root directly, else via a userns."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNET) == 0:
        return True
    return bool(os.getuid() != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0)


def _reachable_as(uid: int, gid: int, reads: Iterable[Path], writes: Iterable[Path]) -> bool:
    """Whether uid/gid could read the interpreter and inputs and reach the writable dirs."""
    reads = [p for p in reads if os.path.lexists(p)]
    os.setegid(gid)
    os.seteuid(uid)
    try:
        ok = all(os.access(p, os.R_OK, effective_ids=True) for p in reads)
        return ok and all(os.access(p.parent, os.X_OK, effective_ids=True) for p in writes)
    finally:
        os.seteuid(0)
        os.setegid(0)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(base, name), uid, gid, follow_symlinks=False)


def drop_privileges(reads: list[Path], writes: list[Path]) -> tuple[bool, bool]:
    """(unprivileged_uid, capabilities_dropped): become nobody when root, else drop every cap.

    Nobody needs to read the interpreter and the inputs; where it can't (a Python under a
    private home), we stay uid 0 with an empty capability set, which Landlock then confines.
    """
    libc = _libc()
    parent = os.getppid()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    switch = False
    if os.getuid() == 0:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
        switch = _reachable_as(uid, gid, reads, writes)
        if switch:
            for path in writes:
                _chown_tree(path, uid, gid)
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if switch:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:  # root that nobody can't stand in for, or a user namespace's own capabilities
        _clear_capabilities(libc)
    die_with_parent()  # any change of effective ids (the probe above too) cleared it
    if os.getppid() != parent:
        os._exit(1)
    return os.getuid() != 0, _capabilities() == (0, 0)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _clear_capabilities(libc: ctypes.CDLL) -> None:
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)()
    libc.capset(ctypes.byref(header), data)


def _capabilities() -> tuple[int, int]:
    """(effective, permitted) capability masks of this process."""
    values = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            values[key] = value.strip()
    return int(values.get("CapEff", "1"), 16), int(values.get("CapPrm", "1"), 16)


def set_no_new_privs() -> bool:
    """No setuid binary or file capability can raise privileges again."""
    return bool(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    if sys.platform != "linux":
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(abi), 0)


def restrict_filesystem(reads: Iterable[Path], writes: Iterable[Path]) -> bool:
    """Landlock: read (and map) `reads`, read and write `writes`, nothing else; TCP denied too."""
    abi = landlock_abi()
    if abi < 1:
        return False
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    handled = (1 << 13) - 1
    handled |= LL_REFER if abi >= 2 else 0
    handled |= LL_TRUNCATE if abi >= 3 else 0
    handled |= LL_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return False
    try:
        rules = [(Path(p), LL_READ) for p in reads] + [(Path(p), handled) for p in writes]
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                allowed = access & handled
                if not path.is_dir():
                    allowed &= LL_FILE_RIGHTS
                rule = _PathBeneath(allowed, fd)
                if (
                    libc.syscall(
                        SYS_LANDLOCK_ADD_RULE,
                        ruleset,
                        LANDLOCK_RULE_PATH_BENEATH,
                        ctypes.byref(rule),
                        0,
                    )
                    != 0
                ):
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        return bool(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0)
    finally:
        os.close(ruleset)


def interpreter_paths() -> list[Path]:
    """What the interpreter needs to read: its prefixes, stdlib, site-packages, the code root."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent}
    paths |= {Path(p) for p in sys.path if p and Path(p).exists()}
    paths |= {Path(p).resolve() for p in list(paths)}
    return sorted(paths)


def deny_syscalls() -> bool:
    """seccomp: refuse network sockets, namespaces, tracing and kernel state (EPERM)."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError):
        return False
    import socket

    filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        with contextlib.suppress(Exception):  # a syscall this architecture lacks
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
    filt.add_rule(
        seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX)
    )
    for flag in NAMESPACE_FLAGS:
        filt.add_rule(
            seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag)
        )
    # clone3 passes its flags in memory a filter can't read: make libc fall back to clone.
    filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    try:
        filt.load()
    except OSError:
        return False
    return True


def preload_seccomp() -> None:
    """Import pyseccomp (it locates libseccomp with a subprocess) before Landlock limits exec."""
    with contextlib.suppress(ImportError, OSError):
        import pyseccomp  # noqa: F401
