"""Runs every `buf curl` example in README.md's ```sh blocks, in order, against a running
server, the way a reader would: `<id>`, `<etag>` and `<authenticator id>` are taken from
earlier answers, TOTP codes are computed from the enrolment's secret. Each example must
succeed and answer what the README says it does, so the README cannot drift from the API.

Env: ROSTER_ADDR (host:port), ROSTER_API_KEY. Needs npx (for @bufbuild/buf).
"""

import base64
import hashlib
import hmac
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADDR = os.environ["ROSTER_ADDR"]
KEY = os.environ["ROSTER_API_KEY"]
BUF = ["npx", "--yes", "@bufbuild/buf@1.75.0"]
STREAM_SECONDS = 8


def examples():
    """The `buf curl` commands of README.md's sh blocks, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("buf curl"):
                yield line


def totp(secret, step_offset=0):
    """RFC 6238 code (SHA-1, 6 digits, 30 s) for the current step plus `step_offset`."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    counter = int(time.time()) // 30 + step_offset
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    number = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{number % 1_000_000:06d}"


def documents(out):
    """The JSON documents buf curl printed (one per response message)."""
    decoder = json.JSONDecoder()
    docs, i = [], 0
    while True:
        while i < len(out) and out[i].isspace():
            i += 1
        if i >= len(out):
            return docs
        doc, i = decoder.raw_decode(out, i)
        docs.append(doc)


def run(args, stream):
    """Runs buf; a stream is read for STREAM_SECONDS and then its process group is stopped."""
    proc = subprocess.Popen(
        BUF + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=STREAM_SECONDS if stream else 120)
    except subprocess.TimeoutExpired:
        if not stream:
            raise
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
        return 0, out, err
    return proc.returncode, out, err


state = {}


def remember(docs):
    for d in docs:
        user = d.get("user") or {}
        if user.get("id"):
            state.setdefault("<id>", user["id"])
            if user["id"] == state["<id>"]:
                state["<etag>"] = user["etag"]
        if d.get("secret"):
            state["secret"] = d["secret"]
            state["<authenticator id>"] = d["authenticator"]["id"]


def ok(result):
    return isinstance(result, str) and result.endswith("_OK")


# What each example must answer. A new example without an entry here fails the run.
EXPECT = {
    "--list-methods": lambda out, docs: "roster.v1.UserService/CreateUser" in out,
    "UserService/CreateUser": lambda out, docs: docs[0]["user"]["email"] == "ada@example.com"
    and docs[0]["user"]["hasPassword"],
    "UserService/GetUser": lambda out, docs: docs[0]["user"]["id"] == state["<id>"],
    "UserService/BatchGetUsers": lambda out, docs: [u["id"] for u in docs[0]["users"]]
    == [state["<id>"]]
    and docs[0]["notFoundIds"] == ["0190b5e4-0000-7000-8000-000000000000"],
    "UserService/ListUsers": lambda out, docs: [u["id"] for u in docs[0]["users"]]
    == [state["<id>"]],
    "UserService/UpdateUser": lambda out, docs: docs[0]["user"]["displayName"] == "Ada L.",
    "AuthenticatorService/VerifyPassword": lambda out, docs: ok(docs[0]["result"])
    and docs[0]["user"]["loginCount"] == "1",
    "AuthenticatorService/CheckPassword": lambda out, docs: not docs[0].get("acceptable")
    and "common" in docs[0]["problems"][0]
    and docs[0]["policy"]["minLength"] == 8,
    "AuthenticatorService/EnrollTotp": lambda out, docs: docs[0]["otpauthUri"].startswith(
        "otpauth://totp/"
    ),
    "AuthenticatorService/ConfirmTotp": lambda out, docs: ok(docs[0]["result"])
    and docs[0]["authenticator"]["confirmed"],
    "AuthenticatorService/VerifyFactor": lambda out, docs: ok(docs[0]["result"]),
    "IdentityService/LinkIdentity": lambda out, docs: docs[0]["identity"]["userId"]
    == state["<id>"],
    "IdentityService/LookupUserByIdentity": lambda out, docs: docs[0]["user"]["id"]
    == state["<id>"],
    # The walkthrough's sign-in succeeded, so the user has no failures to list.
    "LogService/ListEvents": lambda out, docs: docs == [{}],
    # Replay from 0: every event of the walkthrough, in position order.
    "LogService/StreamEvents": lambda out, docs: [
        (int(d["event"]["position"]), d["event"]["type"][len("EVENT_TYPE_") :]) for d in docs
    ]
    == list(
        enumerate(
            [
                # `serve` made the default project and its dev key: operator events.
                "PROJECT_CREATED",
                "API_KEY_CREATED",
                "USER_CREATED",
                "USER_UPDATED",
                "LOGIN_SUCCEEDED",
                "AUTHENTICATOR_ENROLLED",
                "AUTHENTICATOR_CONFIRMED",
                "FACTOR_VERIFIED",
                "IDENTITY_LINKED",
            ],
            start=1,
        )
    ),
    # Filtered to blocks, of which the walkthrough made none: only the checkpoint at the end
    # of the backlog (the last event's position), then nothing while the log is quiet.
    "LogService/StreamEvents with checkpoints": lambda out, docs: docs
    == [{"checkpoint": {"position": "9"}}],
}


def main():
    seen = set()
    for line in examples():
        args = shlex.split(line, comments=True)[2:]  # drop "buf curl"
        method = next((a.split("/roster.v1.")[-1] for a in args if "/roster.v1." in a), None)
        name = method or "--list-methods"
        if '"checkpoints":true' in line:
            name += " with checkpoints"
        if name not in EXPECT:
            sys.exit(f"README example has no expectation in readme.py: {line}")
        fixed = []
        for a in args:
            a = a.replace("$KEY", KEY).replace("http://127.0.0.1:50051", f"http://{ADDR}")
            for placeholder in ("<id>", "<etag>", "<authenticator id>"):
                if placeholder in a:
                    a = a.replace(placeholder, state[placeholder])
            if '"code":"492039"' in a:
                # Confirm with this step's code; verify with the next one (±1 step is
                # accepted and a step works once).
                code = totp(state["secret"], 1 if method.endswith("VerifyFactor") else 0)
                a = a.replace('"code":"492039"', f'"code":"{code}"')
            fixed.append(a)
        code, out, err = run(["curl"] + fixed, stream="StreamEvents" in name)
        if code != 0:
            sys.exit(f"README example failed ({name}): {line}\n{out}{err}")
        docs = documents(out) if method else []
        if not EXPECT[name](out, docs):
            sys.exit(f"README example answered unexpectedly ({name}): {line}\n{out}")
        remember(docs)
        seen.add(name)
    if seen != set(EXPECT):
        sys.exit(f"README examples missing: {sorted(set(EXPECT) - seen)}")
    print(f"README buf curl examples: {len(seen)} ran and answered as documented")


main()
