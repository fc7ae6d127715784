"""Flagged source images -> a Key Object Selection document referencing them."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..results import ResultsDocument
from .common import BuildError, InputIndex, RunContext, finish
from .sr import device_observer


def build_key_objects(doc: ResultsDocument, index: InputIndex, ctx: RunContext,
                      series: tuple[str, int]) -> Dataset | None:
    if not doc.key_images:
        return None
    flagged: dict[str, Dataset] = {}
    for k in doc.key_images:
        flagged[k.sop_uid] = index.get_sop(doc.file, f"{k.where}.sop_uid", k.sop_uid)
    device = device_observer(ctx)
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest, referenced_objects=list(flagged.values()),
            observer_device_context=device,
            description=f"Flagged by {ctx.model_name}"[:1024])
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=list(flagged.values()), content=content, series_instance_uid=series[0],
            series_number=series[1], sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="dts")
    except (ValueError, TypeError) as exc:
        raise BuildError(doc.file, "key_images", f"no valid key object selection could be "
                         f"built: {exc}") from None
    return finish(kos, ctx, "kos", index)
