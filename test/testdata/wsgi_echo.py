"""A real CGI-style backend for the end-to-end tests: Python's wsgiref
server on 127.0.0.1, answering every request with the request's WSGI
environ as JSON (the HTTP_* variables, which is how CGI, WSGI, PHP and Rack
backends see header fields: '-' and '_' both become '_', and repeated
fields are joined with ','), and the raw header lines it received.

It prints the port it listens on, then serves until it is killed.
"""
import json
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server


class Handler(WSGIRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


def app(environ, start_response):
    body = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    for k in ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE"):
        body[k] = environ.get(k, "")
    data = json.dumps(body, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


server = make_server("127.0.0.1", 0, app, handler_class=Handler)
print(server.server_port, flush=True)
sys.stdout.close()
server.serve_forever()
