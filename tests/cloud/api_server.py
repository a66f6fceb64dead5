"""Neutron 29's API (the WSGI application neutron.wsgi.api, which reads --config-file from
argv) served by the standard library's threaded WSGI server on 127.0.0.1: Neutron 29 has no
neutron-server script, and this keeps the deployment to the virtualenv's own python."""

import os
import socketserver
import sys
from wsgiref import simple_server

from neutron.wsgi import api  # noqa: E402  boots Neutron: configuration, plugin, extensions


class Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, fmt, *args):
        sys.stderr.write("api: " + (fmt % args) + "\n")


# Neutron 29 registers no bind_host/bind_port any more (the WSGI server owns the socket).
host, port = os.environ["SG_CLOUD_API_LISTEN"].rsplit(":", 1)
httpd = simple_server.make_server(host, int(port), api.application, Server, QuietHandler)
sys.stderr.write(f"api: serving on {host}:{port}\n")
httpd.serve_forever()
