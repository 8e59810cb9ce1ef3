#!/usr/bin/env python3
"""A fan's journey through stagedoor from Python, with stubs generated from proto/.

What a team generating a client in another language sees: the protos compile with stock
grpcio-tools, the services answer it over plain gRPC, the token travels as
`authorization: Bearer <token>` metadata, and refusals carry a google.rpc.ErrorInfo that a
stock client decodes (grpcio-status). Run by services/payment/tests/payment/interop.rs
against four real services; usable by hand against `stagedoor up`:

    python journey.py --concert-id <id from `stagedoor up`>
"""

import argparse
import os
import sys
import tempfile
import uuid


def generate_stubs(proto_root: str, out: str) -> None:
    """Compiles every .proto under proto_root into Python modules under out."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk(proto_root)
        for name in names
        if name.endswith(".proto")
    )
    code = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
         f"--grpc_python_out={out}", *protos]
    )
    if code != 0:
        sys.exit(f"grpcio-tools could not compile the protos (exit {code})")
    sys.path.insert(0, out)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", default="127.0.0.1:50051")
    parser.add_argument("--concert", default="127.0.0.1:50052")
    parser.add_argument("--point", default="127.0.0.1:50053")
    parser.add_argument("--payment", default="127.0.0.1:50054")
    parser.add_argument("--concert-id", required=True)
    parser.add_argument("--proto", default=os.path.join(here, "..", "..", "proto"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        generate_stubs(os.path.abspath(args.proto), out)
        journey(args)


def journey(args) -> None:
    import grpc
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from stagedoor.concert.v1 import concert_pb2, concert_pb2_grpc
    from stagedoor.payment.v1 import payment_pb2, payment_pb2_grpc
    from stagedoor.point.v1 import point_pb2, point_pb2_grpc
    from stagedoor.queue.v1 import queue_pb2, queue_pb2_grpc

    user = f"py-{uuid.uuid4().hex[:12]}"
    queue = queue_pb2_grpc.QueueServiceStub(grpc.insecure_channel(args.queue))
    concert = concert_pb2_grpc.ConcertServiceStub(grpc.insecure_channel(args.concert))
    point = point_pb2_grpc.PointServiceStub(grpc.insecure_channel(args.point))
    payment = payment_pb2_grpc.PaymentServiceStub(grpc.insecure_channel(args.payment))

    ticket = queue.IssueToken(
        queue_pb2.IssueTokenRequest(concert_id=args.concert_id, user_id=user), timeout=10
    ).ticket
    if ticket.status != queue_pb2.TOKEN_STATUS_ACTIVE:
        sys.exit(f"expected to be admitted at once, got {queue_pb2.TokenStatus.Name(ticket.status)}")
    auth = [("authorization", f"Bearer {ticket.token}")]

    dates = concert.ListAvailableDates(
        concert_pb2.ListAvailableDatesRequest(concert_id=args.concert_id), metadata=auth, timeout=10
    ).schedules
    assert dates, "a date with free seats"
    seats = concert.ListAvailableSeats(
        concert_pb2.ListAvailableSeatsRequest(schedule_id=dates[0].schedule_id),
        metadata=auth,
        timeout=10,
    ).seats
    free = [seat.seat_number for seat in seats if seat.status == concert_pb2.SEAT_STATUS_AVAILABLE]
    wanted = free[:2]
    hold = concert.HoldSeats(
        concert_pb2.HoldSeatsRequest(
            schedule_id=dates[0].schedule_id, seat_numbers=wanted, request_id=f"hold-{user}"
        ),
        metadata=auth,
        timeout=10,
    ).hold
    assert hold.status == concert_pb2.HOLD_STATUS_HELD, hold
    assert hold.expire_time.seconds > 0, "expire_time is a google.protobuf.Timestamp"

    point.ChargePoints(
        point_pb2.ChargePointsRequest(user_id=user, amount=hold.total_price, request_id=f"top-up-{user}"),
        timeout=10,
    )

    # A refusal, decoded the way any gRPC client can: status code, then the ErrorInfo detail.
    pay = payment_pb2.PayRequest(hold_id=hold.hold_id, request_id=f"pay-{user}")
    try:
        payment.Pay(pay, timeout=10)
        sys.exit("Pay without a token was accepted")
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        status = rpc_status.from_call(error)
        infos = []
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                infos.append(info)
        assert [(i.reason, i.domain) for i in infos] == [("MISSING_TOKEN", "stagedoor")], infos

    receipt = payment.Pay(pay, metadata=auth, timeout=30).payment
    assert receipt.status == payment_pb2.PAYMENT_STATUS_COMPLETED, receipt
    assert receipt.amount == hold.total_price, receipt
    assert list(receipt.seat_numbers) == sorted(wanted), receipt
    assert receipt.balance_after == 0, receipt
    assert receipt.user_id == user and receipt.hold_id == hold.hold_id, receipt
    # Pressing Pay again: the same receipt, nothing charged twice.
    again = payment.Pay(pay, metadata=auth, timeout=30).payment
    assert again.payment_id == receipt.payment_id, (again, receipt)
    balance = point.GetBalance(point_pb2.GetBalanceRequest(user_id=user), timeout=10).balance
    assert balance == 0, balance
    status = queue.GetQueueStatus(queue_pb2.GetQueueStatusRequest(token=ticket.token), timeout=10)
    assert status.ticket.status == queue_pb2.TOKEN_STATUS_DONE, status
    # Leaving after paying changes nothing; a fan who enters and leaves ends EXPIRED.
    left = queue.LeaveQueue(queue_pb2.LeaveQueueRequest(token=ticket.token), timeout=10).ticket
    assert left.status == queue_pb2.TOKEN_STATUS_DONE, left
    other = queue.IssueToken(
        queue_pb2.IssueTokenRequest(concert_id=args.concert_id, user_id=f"{user}-b"), timeout=10
    ).ticket
    left = queue.LeaveQueue(queue_pb2.LeaveQueueRequest(token=other.token), timeout=10).ticket
    assert left.status == queue_pb2.TOKEN_STATUS_EXPIRED and left.token == other.token, left

    print(f"python interop: {user} paid {receipt.amount} for seats {list(receipt.seat_numbers)}: ok")


if __name__ == "__main__":
    main()
