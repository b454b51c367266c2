"""The job report: one self-contained HTML page (inline SVG charts, inline CSS, no script and
no external asset) built from a job as the API returns it. `charts` holds the geometry, `view`
reads the job, `render` fills the Jinja2 template shipped in `templates/`."""
