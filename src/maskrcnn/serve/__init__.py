"""``maskrcnn serve``: a model behind HTTP (FastAPI on uvicorn) and a web page to try it.

app.py      the routes (POST /predict, GET /health, GET /model, GET /), upload limits, ``run``
worker.py   the one thread that owns the model and batches the requests that arrive together
static/     the web page (plain HTML and JavaScript, no build step)
"""
