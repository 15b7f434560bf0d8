"""The HTTP routes, one module per resource; :func:`cotune.service.api.create_app` includes their routers.

Routes are plain functions: the store, the service config, the job runner and the caller's tenant reach them
as FastAPI dependencies (:mod:`cotune.service.routes.deps`), read from the app they are mounted on.
"""
