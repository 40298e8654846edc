"""deltatune studio: a local web app over the library (docs/studio.md).

Server-rendered pages (``pages/``: one module per page, registered in ``pages/__init__.py``), a little
vanilla JavaScript and CSS shipped in ``static/`` (nothing fetched from a CDN), charts drawn as inline SVG
by the same pieces as the HTML reports (``html_report``). ``app.create_app`` builds the FastAPI app;
``server.studio_command`` is ``deltatune studio``.
"""
