"""The web dashboard at /ui (issue #16): server-rendered pages, one small script, every asset
served by the app. `install(app)` adds its routes, its static files and its sign-in redirect."""

from __future__ import annotations

from app.ui.routes import install

__all__ = ["install"]
