"""Destination ``filter``: only output objects whose attributes match the glob patterns go
to that destination (the predecessor's ``destination[].filter``, which it never applied);
the others are recorded as ``skipped`` in the destination's send state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dts import config as config_mod
from dts.config import Destination
from dts.dicom.store import Item
from dts.errors import ConfigError
from dts.sender import apply_filter
from dts.spool import Job, Queue, Spool
from tests.helpers import make_instance, run_dts, station_config
from tests.plugins.peers import Orthanc

CT = "1.2.840.10008.5.1.4.1.1.2"


def _item(tmp_path: Path, **attrs: Any) -> Item:
    uid = generate_uid()
    path = make_instance(tmp_path / f"{uid}.dcm", study_uid="1.2.3", series_uid="1.2.3.4",
                         sop_uid=uid, **attrs)
    return Item(path, uid, CT, ExplicitVRLittleEndian)


def test_filter_semantics(tmp_path: Path) -> None:
    seg = _item(tmp_path, SeriesDescription="AI segmentation")
    empty = _item(tmp_path, SeriesDescription="")
    none = _item(tmp_path)
    multi = _item(tmp_path, ImageType=["DERIVED", "SECONDARY", "AI"])
    items = [seg, empty, none, multi]

    def kept(*tables: dict[str, str]) -> list[Item]:
        keep, skipped = apply_filter(Destination("d", folder=tmp_path, filter=tables), items)
        assert sorted(skipped) == sorted(i.sop_uid for i in items if i not in keep)
        return keep

    assert kept() == items                                     # no filter: everything
    assert kept({"SeriesDescription": "*"}) == [seg, empty]    # missing: no match
    assert kept({"SeriesDescription": "AI*"}) == [seg]
    assert kept({"SeriesDescription": "ai*"}) == []            # case counts
    assert kept({"ImageType": "DERIVED\\*"}) == [multi]        # values joined by \
    assert kept({"SeriesDescription": "AI*", "Modality": "MR"}) == []   # every pattern
    assert kept({"SeriesDescription": "AI*"}, {"ImageType": "*AI"}) == [seg, multi]  # any table


@pytest.mark.parametrize("value,reason", [
    ({"SeriesDescriptoin": "*"}, "'SeriesDescriptoin' is not a DICOM attribute keyword"),
    ({"SeriesDescription": 3}, "expected a glob pattern string"),
    ({}, "expected a table of DICOM keywords"),
    ("*", "expected a table of DICOM keywords"),
])
def test_filter_is_checked_at_load(tmp_path: Path, value: Any, reason: str) -> None:
    path = station_config(tmp_path, destinations=[{"name": "d", "folder": str(tmp_path / "o"),
                                                   "filter": value}])
    with pytest.raises(ConfigError) as err:
        config_mod.load(path)
    assert err.value.key == "destination.d.filter" and reason in err.value.reason


def test_only_matching_objects_reach_the_destination(tmp_path: Path, orthanc: Orthanc) -> None:
    spool = Spool(tmp_path / "spool").ensure()
    job = spool.create_tmp_job()
    study, series = generate_uid(), generate_uid()
    outputs, uids = [], {}
    for label, attrs in (("seg", {"SeriesDescription": "AI segmentation"}),
                         ("plain", {"SeriesDescription": "scratch"}),
                         ("bare", {})):
        uid = generate_uid()
        make_instance(job.output_dir / f"{uid}.dcm", study_uid=study, series_uid=series,
                      sop_uid=uid, **attrs)
        outputs.append({"file": f"{uid}.dcm", "sop_uid": uid, "sop_class": CT,
                        "transfer_syntax": ExplicitVRLittleEndian})
        uids[label] = uid
    (job.output_dir / "output.json").write_text("{}")
    job.write({"stream": "seg", "study_uid": study, "calling_ae": "MODALITY",
               "outputs": outputs, "other_files": ["output.json"]})
    spool.publish(job, Queue.SEND)
    config = station_config(tmp_path, destinations=[
        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.port,
         "filter": {"SeriesDescription": "*"}},
        {"name": "ai-only", "folder": str(tmp_path / "reports"),
         "filter": {"SeriesDescription": "AI *"}}],
        streams=[{"name": "seg", "command": ["true"], "destinations": ["pacs", "ai-only"]}])
    proc = run_dts("send", "--once", config=config)
    assert proc.returncode == 0, proc.stderr
    assert orthanc.sop_uids() == {uids["seg"], uids["plain"]}
    delivered = sorted(p.name for p in (tmp_path / "reports" / job.id).iterdir())
    assert delivered == sorted([f"{uids['seg']}.dcm", "output.json"])
    data = Job(spool.find(job.id)[1]).read()
    assert str(spool.find(job.id)[0]) == "done"
    pacs, folder = data["destinations"]["pacs"], data["destinations"]["ai-only"]
    assert pacs["status"] == "done" and pacs["skipped"] == [uids["bare"]]
    assert sorted(pacs["sent"]) == sorted([uids["seg"], uids["plain"]])
    assert folder["sent"] == [uids["seg"]]
    assert sorted(folder["skipped"]) == sorted([uids["plain"], uids["bare"]])
    filtered = [e for e in Job(spool.find(job.id)[1]).events() if e["event"] == "filtered"]
    assert sorted((e["destination"], e["count"]) for e in filtered) == [("ai-only", 2),
                                                                        ("pacs", 1)]
