"""A WSGI app for tests/tests/proxy_hostile.rs: answers, as JSON, what a WSGI app sees.

Run as `python3 echo_wsgi.py PORT`; serves on 127.0.0.1:PORT with the standard library's
wsgiref (a thread per request). wsgiref, like CGI and most WSGI servers, maps a header
`X_Warren_User` to the same `HTTP_X_WARREN_USER` key as `X-Warren-User`, and joins
repeated headers with commas.

Every answer is `{"HTTP_...": value for every header, "PATH_INFO", "QUERY_STRING",
"REQUEST_METHOD", "RAW_URI" (the request-target as received)}`. `GET /set-cookie` also
sets cookies with the proxy's own names beside an app cookie.
"""

import json
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class Handler(WSGIRequestHandler):
    def get_environ(self):
        env = super().get_environ()
        env["RAW_URI"] = self.path
        return env

    def log_message(self, format, *args):
        pass


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def app(environ, start_response):
    seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
    for k in ("PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "RAW_URI"):
        seen[k] = environ.get(k, "")
    body = json.dumps(seen, sort_keys=True).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if environ.get("PATH_INFO") == "/set-cookie":
        headers += [
            ("Set-Cookie", "__Host-warren_session=from-the-app; Path=/; Secure; HttpOnly"),
            ("Set-Cookie", "__Secure-warren_login=from-the-app; Path=/; Secure; HttpOnly"),
            ("Set-Cookie", "app_cookie=kept; Path=/"),
        ]
    start_response("200 OK", headers)
    return [body]


if __name__ == "__main__":
    with make_server("127.0.0.1", int(sys.argv[1]), app, server_class=Server,
                     handler_class=Handler) as server:
        print("listening", flush=True)
        server.serve_forever()
