"""A Python backend calling Roster with stubs generated from proto/ by grpcio-tools.

Run by tests/polyglot/run (ROSTER_ADDR, ROSTER_API_KEY, GENERATED set). Exits non-zero with a
message on the first thing that is not as the API promises.
"""
import json
import os
import sys
import uuid

sys.path.insert(0, os.environ["GENERATED"])

import grpc  # noqa: E402
from google.protobuf import field_mask_pb2  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402
from roster.v1 import authenticator_pb2, authenticator_pb2_grpc  # noqa: E402
from roster.v1 import log_pb2, log_pb2_grpc  # noqa: E402
from roster.v1 import user_pb2, user_pb2_grpc  # noqa: E402


def check(cond, what):
    if not cond:
        sys.exit(f"python scenario: {what}")


def reason_and_delay(e):
    """The ErrorInfo reason and RetryInfo delay (whole seconds) of a failed call."""
    reason, delay = None, None
    for d in rpc_status.from_call(e).details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = info.reason
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            d.Unpack(retry)
            delay = retry.retry_delay.seconds
    return reason, delay


# The README's service config ("Retrying calls"): grpcio retries UNAVAILABLE by itself.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": f"roster.v1.{s}"}
             for s in ("UserService", "AuthenticatorService", "IdentityService", "LogService")],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "5s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def main():
    channel = grpc.insecure_channel(
        os.environ["ROSTER_ADDR"],
        options=[("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)],
    )
    meta = [("authorization", "Bearer " + os.environ["ROSTER_API_KEY"])]
    users = user_pb2_grpc.UserServiceStub(channel)
    tag = uuid.uuid4().hex[:8]

    # Create, then look up by email (case-insensitively).
    made = []
    for i in range(5):
        r = users.CreateUser(
            user_pb2.CreateUserRequest(
                user=user_pb2.User(
                    email=f"py{i}.{tag}@example.com",
                    given_name="Py",
                    external_id=f"py-{tag}-{i}",
                )
            ),
            metadata=meta,
        )
        made.append(r.user)
    found = users.LookupUser(
        user_pb2.LookupUserRequest(email=f"PY0.{tag}@EXAMPLE.COM"), metadata=meta
    ).user
    check(found.id == made[0].id, "LookupUser by email finds the user")

    # A client set to compress its requests (gzip) is served as any other.
    gz = users.GetUser(
        user_pb2.GetUserRequest(id=made[1].id), metadata=meta, compression=grpc.Compression.Gzip
    ).user
    check(gz.email == made[1].email, "a gzip-compressed request is served")

    # Update one field with a mask and the etag.
    updated = users.UpdateUser(
        user_pb2.UpdateUserRequest(
            user=user_pb2.User(id=found.id, display_name="Python Person"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            etag=found.etag,
        ),
        metadata=meta,
    ).user
    check(updated.display_name == "Python Person", "UpdateUser sets the masked field")
    check(updated.given_name == "Py", "UpdateUser keeps fields outside the mask")
    check(updated.etag != found.etag, "the etag changes")

    # List with a filter, two pages of two and a last one.
    seen, token = [], ""
    while True:
        page = users.ListUsers(
            user_pb2.ListUsersRequest(
                filter=f'external_id:"py-{tag}-*"', page_size=2, page_token=token
            ),
            metadata=meta,
        )
        seen.extend(u.id for u in page.users)
        token = page.next_page_token
        if not token:
            break
    check(sorted(seen) == sorted(u.id for u in made), f"paging returns each user once: {seen}")

    # A create whose answer was lost, sent again with the id it chose: ALREADY_EXISTS whose
    # ResourceInfo names that id, so the caller knows the first went through.
    chosen = str(uuid.uuid4())
    create = user_pb2.CreateUserRequest(
        user=user_pb2.User(email=f"retry.{tag}@example.com"), user_id=chosen
    )
    users.CreateUser(create, metadata=meta)
    try:
        users.CreateUser(create, metadata=meta)
        check(False, "a create sent again fails")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.ALREADY_EXISTS, f"ALREADY_EXISTS, got {e.code()}")
        holder = None
        for d in rpc_status.from_call(e).details:
            if d.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                info = error_details_pb2.ResourceInfo()
                d.Unpack(info)
                holder = info.resource_name
        check(holder == chosen, f"ResourceInfo names the chosen id: {holder}")

    # A bad request: INVALID_ARGUMENT with field violations in the details.
    try:
        users.CreateUser(
            user_pb2.CreateUserRequest(user=user_pb2.User(email="not an email", phone_number="12")),
            metadata=meta,
        )
        check(False, "a bad CreateUser fails")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.INVALID_ARGUMENT, f"INVALID_ARGUMENT, got {e.code()}")
        status = rpc_status.from_call(e)
        fields = []
        for d in status.details:
            if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                d.Unpack(br)
                fields = sorted(v.field for v in br.field_violations)
        check(fields == ["user.email", "user.phone_number"], f"field violations: {fields}")

    # A streaming export of just these users, with a read mask.
    exported = [
        m.user.email
        for m in users.ExportUsers(
            user_pb2.ExportUsersRequest(
                filter=f'external_id:"py-{tag}-*"',
                read_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
            metadata=meta,
        )
    ]
    check(len(exported) == 5 and all(e.startswith("py") for e in exported), f"export: {exported}")

    # ImportUsers from a generator: a CREATE_ONLY run sent again under its run_id (a client
    # resuming after a break) finds its own users, CREATED and replayed; another run fails them.
    def import_run(run_id, records):
        def requests():
            yield user_pb2.ImportUsersRequest(options=user_pb2.ImportOptions(
                mode=user_pb2.IMPORT_MODE_CREATE_ONLY, run_id=run_id))
            for r in records:
                yield user_pb2.ImportUsersRequest(record=r)
        results, summary = [], None
        for m in users.ImportUsers(requests(), metadata=meta):
            if m.HasField("result"):
                results.append(m.result)
            else:
                summary = m.summary
        return sorted(results, key=lambda r: r.index), summary

    run = str(uuid.uuid4())
    records = [user_pb2.ImportRecord(user=user_pb2.User(email=f"imp{i}.{tag}@example.com"),
                                     user_id=str(uuid.uuid4())) for i in range(3)]
    first, summary = import_run(run, records)
    check(summary.created == 3 and not any(r.replayed for r in first), f"import: {first}")
    again, summary = import_run(run, records)
    check(summary.created == 3 and all(r.replayed for r in again)
          and [r.user_id for r in again] == [r.user_id for r in records],
          f"import sent again: {again}")
    other, summary = import_run(str(uuid.uuid4()), records[:1])
    check(summary.failed == 1
          and other[0].error.code == grpc.StatusCode.ALREADY_EXISTS.value[0],
          f"another run: {other}")

    # The server runs with --ip-failure-limit 2: a third attempt from an address that failed
    # twice is refused, with ErrorInfo and RetryInfo a client can read.
    auth = authenticator_pb2_grpc.AuthenticatorServiceStub(channel)
    users.CreateUser(
        user_pb2.CreateUserRequest(
            user=user_pb2.User(email=f"signin.{tag}@example.com"),
            password="correct horse battery staple",
        ),
        metadata=meta,
    )

    def sign_in(password):
        return auth.VerifyPassword(
            authenticator_pb2.VerifyPasswordRequest(
                email=f"signin.{tag}@example.com", password=password, ip="198.51.100.77"
            ),
            metadata=meta,
        )

    for guess in ["wrong guess one", "wrong guess two"]:
        r = sign_in(guess)
        check(r.result == authenticator_pb2.VERIFY_PASSWORD_RESULT_INVALID_CREDENTIALS, f"{r}")
    try:
        sign_in("correct horse battery staple")
        check(False, "a throttled address is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"RESOURCE_EXHAUSTED, got {e.code()}")
        reason, delay = reason_and_delay(e)
        check(reason == "IP_THROTTLED", f"ErrorInfo reason: {reason}")
        check(delay is not None and 0 < delay <= 43200, f"RetryInfo delay: {delay}")

    # The server rations codes and links (--code-resend-secs 30): a second reset token at
    # once is refused with the wait.
    reset = authenticator_pb2.CreatePasswordResetTokenRequest(email=f"signin.{tag}@example.com")
    token = auth.CreatePasswordResetToken(reset, metadata=meta).token
    check(token.startswith("prt_"), "a reset token is issued")
    try:
        auth.CreatePasswordResetToken(reset, metadata=meta)
        check(False, "a second reset token at once is refused")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"RESOURCE_EXHAUSTED, got {e.code()}")
        reason, delay = reason_and_delay(e)
        check(reason == "TOO_MANY_CODES", f"ErrorInfo reason: {reason}")
        check(delay is not None and 0 < delay <= 30, f"RetryInfo delay: {delay}")

    # The audit log as a stream that says where its backlog ends: the one matching event,
    # then a checkpoint at or past it (a message with no event), then the client stops.
    logs = log_pb2_grpc.LogServiceStub(channel)
    stream = logs.StreamEvents(
        log_pb2.StreamEventsRequest(
            filter=f'type = USER_CREATED AND user_id = "{made[0].id}"', checkpoints=True
        ),
        metadata=meta,
        timeout=30,
    )
    first = next(stream)
    check(first.HasField("event"), f"the backlog's event first: {first}")
    check(first.event.type == log_pb2.EVENT_TYPE_USER_CREATED, f"{first.event}")
    end = next(stream)
    check(
        end.HasField("checkpoint") and not end.HasField("event"),
        f"then a checkpoint alone: {end}",
    )
    check(end.checkpoint.position >= first.event.position, f"{end.checkpoint}")
    stream.cancel()
    print("python scenario: ok")


if __name__ == "__main__":
    main()
