"""A receiver for Alertmanager's webhook: prints each alert it is sent, one line each, and
answers 200. It stands where a pager or a chat would (docker/alertmanager.yml)."""
import json
from http.server import BaseHTTPRequestHandler, HTTPServer


class Alerts(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            for alert in json.loads(body).get("alerts", []):
                labels, notes = alert.get("labels", {}), alert.get("annotations", {})
                print(f"{alert.get('status')} {labels.get('alertname')} "
                      f"{labels.get('severity', '')}: {notes.get('summary', '')}", flush=True)
            self.send_response(200)
        except (ValueError, AttributeError):
            self.send_response(400)
        self.end_headers()

    def log_message(self, *args):
        pass


HTTPServer(("0.0.0.0", 9095), Alerts).serve_forever()
