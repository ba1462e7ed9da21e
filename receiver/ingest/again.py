"""A stored callback decoded again (`replay --receipt N`, `POST /api/receipts/N/replay`):
what a raised limit or a newer ci-receiver makes of a body refused, or read, before."""

from __future__ import annotations

from receiver.callback.decode import PayloadError
from receiver.inbox import Reading, Stored
from receiver.ingest.ingest import Intake


class NotDecodedAgain(Exception):
    """Why a receipt cannot be decoded again; `status`: the HTTP answer that says so."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


async def decode_again(inbox: Reading, intake: Intake, receipt_id: int) -> Stored:
    """Ingest receipt `receipt_id`'s body again, as a delivery from `replay`. A body that
    still cannot be decoded is not kept once more (it is kept already). Raises
    `NotDecodedAgain`, or `IntakeUnavailable` when the inbox cannot take it now."""
    receipt = await inbox.receipt(receipt_id)
    if receipt is None:
        raise NotDecodedAgain(f"no receipt {receipt_id}", 404)
    if receipt.cut_from is not None or not receipt.body:
        raise NotDecodedAgain(
            f"receipt {receipt_id} was not kept whole (refused for its size, or its body"
            " removed by retention): it cannot be decoded again",
            409,
        )
    receipt.source_meta = {
        **receipt.source_meta,
        "replayed_receipt": receipt_id,
        "replayed_source": receipt.source,
    }
    receipt.source = "replay"
    try:
        return await intake.ingest(receipt, keep_refused=False)
    except PayloadError as exc:
        raise NotDecodedAgain(
            f"receipt {receipt_id} still cannot be decoded: {exc.reason}: {exc.message}", 422
        ) from None
