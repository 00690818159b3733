"""Detection, kdpipe's second task: YOLO teachers and students through Ultralytics.

The one room that imports the optional ``ultralytics`` package (AGPL-3.0, installed by
``pip install 'kdpipe[detect]'``); nothing outside it does, so the MIT core runs without it.
"""
