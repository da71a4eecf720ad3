"""`roster events --post` checked by the Standard Webhooks reference library for Python: a
receiver that verifies every request as a receiver in production would (signature,
timestamp window, id), and refuses a body changed by one byte, so the check can fail; then
the same log again in batches (`--post-batch`), each request a JSON array, verified alike,
and gzipped (`--post-gzip`): decompressed as a receiver's framework would, then verified."""
import base64
import gzip
import http.server
import os
import secrets
import subprocess
import sys
import tempfile
import threading

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
hook = Webhook(secret)
verified, failed, squeezed = [], [], []


class Receiver(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if headers.get("content-encoding") == "gzip":
            wire = len(body)
            body = gzip.decompress(body)
            squeezed.append((wire, len(body)))
        try:
            event = hook.verify(body, headers)
            # A batch is a list of events; one event per request, the event.
            verified.extend(event if isinstance(event, list) else [event])
            try:
                hook.verify(body[:-1] + b" }", headers)
                failed.append("a changed body verified")
            except WebhookVerificationError:
                pass
            self.send_response(204)
        except WebhookVerificationError as e:
            failed.append(str(e))
            self.send_response(401)
        self.end_headers()


server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=server.serve_forever, daemon=True).start()
with tempfile.NamedTemporaryFile("w", suffix=".whsec", delete=False) as f:
    f.write(secret + "\n")


def deliver(*extra):
    """Runs `roster events --until-caught-up --post` with `extra`; the events verified."""
    verified.clear()
    run = subprocess.run(
        [os.environ["ROSTER_BIN"], "events", "--until-caught-up",
         "--server", "http://" + os.environ["ROSTER_ADDR"],
         "--post", f"http://127.0.0.1:{server.server_address[1]}/roster",
         "--post-secret-file", f.name, *extra],
        capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or failed or not verified:
        sys.exit(f"webhook {extra}: exit {run.returncode}, {len(verified)} verified, failures {failed}: {run.stderr}")
    if secret in run.stderr:
        sys.exit("webhook: the secret was printed")
    return list(verified)


one_by_one = deliver()
batched = deliver("--post-batch", "7")
gzipped = deliver("--post-batch", "50", "--post-gzip")
os.unlink(f.name)
server.shutdown()
for name, got in (("batches", batched), ("gzipped batches", gzipped)):
    if [e["id"] for e in got] != [e["id"] for e in one_by_one]:
        sys.exit(f"webhook: {name} brought {len(got)} events, one by one {len(one_by_one)}")
if not squeezed or any(wire >= plain for wire, plain in squeezed):
    sys.exit(f"webhook: gzipped bodies were not smaller: {squeezed}")
types = sorted({e["type"] for e in one_by_one})
print(f"Python webhook receiver: ok ({len(one_by_one)} events verified by standardwebhooks, "
      f"alone, in batches of 7 and gzipped ({sum(w for w, _ in squeezed)} bytes for "
      f"{sum(p for _, p in squeezed)}); {', '.join(types[:4])}, ...)")
