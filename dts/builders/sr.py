"""Measurements -> a Comprehensive 3D SR with a TID 1500 Measurement Report; plain-text
findings -> an Enhanced SR (docs/results.md, "What is built")."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ..results import Code, Measurement, ResultsDocument, unit_meaning
from .common import BuildError, InputIndex, RunContext, coded, finish

DEFAULT_SCHEME = "99DTS"       # a private coding scheme: a measurement without `code`
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
YES = hd.sr.CodedConcept("373066001", "SCT", "Yes")
NO = hd.sr.CodedConcept("373067005", "SCT", "No")
_CODE_VALUE = re.compile(r"^[A-Za-z0-9_.-]{1,16}$")


def default_code(name: str) -> Code:
    """``name`` as a concept of the private scheme 99DTS (the name itself when it fits a
    CodeValue, else ``dts-`` and a hash of it)."""
    value = name if _CODE_VALUE.match(name) else "dts-" + hashlib.sha1(
        name.encode()).hexdigest()[:12]
    return Code(value, DEFAULT_SCHEME, name[:64])


def device_observer(ctx: RunContext) -> Any:
    """The model as the SR's observer device (its UID derived from its name)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["dts-model", ctx.model_name]), name=ctx.model_name[:64],
        manufacturer_name="dts", model_name=ctx.model_version[:64])
    return hd.sr.ObserverContext(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                                 observer_identifying_attributes=device)


def observation_context(ctx: RunContext) -> Any:
    return hd.sr.ObservationContext(observer_device_context=device_observer(ctx))


def text_lines(doc: ResultsDocument) -> list[str]:
    """The plain-text findings, and the text values without a code (a TID 1500 report has
    no place for them)."""
    lines = list(doc.findings)
    for m in doc.measurements:
        value = m.entry["value"]
        if isinstance(value, str) and m.value_code is None:
            lines.append(f"{m.entry['name']}: {value}")
    return lines


def _group_key(m: Measurement) -> tuple[str, str, Code | None]:
    return (m.tracking_id or "", m.entry.get("series_uid", ""), m.finding)


def build_measurement_report(doc: ResultsDocument, index: InputIndex, ctx: RunContext,
                             series: tuple[str, int]) -> Dataset | None:
    groups: dict[tuple[str, str, Code | None], list[Measurement]] = {}
    for m in doc.measurements:
        value = m.entry["value"]
        if isinstance(value, str) and m.value_code is None:
            continue  # to the text report
        groups.setdefault(_group_key(m), []).append(m)
    if not groups:
        return None
    file = doc.file
    imaging = []
    for (tracking, series_uid, finding), items in groups.items():
        numbers, evaluations = [], []
        for m in items:
            name = coded(m.code or default_code(m.entry["name"]))
            sites = [hd.sr.FindingSite(coded(m.finding_site))] if m.finding_site else None
            value = m.entry["value"]
            if isinstance(value, (bool, str)):
                evaluations.append(hd.sr.QualitativeEvaluation(
                    name, coded(m.value_code) if m.value_code else (YES if value else NO)))
                continue
            unit = m.entry.get("unit") or "1"
            refs = [hd.sr.SourceImageForMeasurement.from_source_image(
                index.get_sop(file, m.where, uid)) for uid in m.sop_uids] or None
            numbers.append(hd.sr.Measurement(
                name=name, value=value,
                unit=hd.sr.CodedConcept(unit, "UCUM", unit_meaning(unit) or unit),
                finding_sites=sites, referenced_images=refs))
        sources = None
        label = tracking or "measurements"
        if series_uid:
            source = index.get_series(file, items[0].where, series_uid)
            sources = [hd.sr.SourceImageForMeasurementGroup.from_source_image(h)
                       for h in source.headers]
            # a UID is too long for a tracking identifier; the images name the series
            label = tracking or f"series {source.headers[0].get('SeriesNumber', '')}".strip()
        imaging.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                         identifier=label[:64]),
            finding_type=coded(finding) if finding else None,
            algorithm_id=hd.sr.AlgorithmIdentification(name=ctx.model_name[:64],
                                                       version=ctx.model_version[:64]),
            measurements=numbers or None, qualitative_evaluations=evaluations or None,
            source_images=sources))
    report = hd.sr.MeasurementReport(observation_context=observation_context(ctx),
                                     procedure_reported=IMAGING_PROCEDURE,
                                     imaging_measurements=imaging)
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=index.all_headers(), content=report[0],
            series_instance_uid=series[0], series_number=series[1],
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dts",
            is_complete=True, previous_versions=ctx.previous_srs("sr") or None)
    except (ValueError, TypeError) as exc:
        raise BuildError(file, "measurements", f"no valid SR could be built: {exc}") from None
    if any(m.code is None for m in doc.measurements):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = DEFAULT_SCHEME
        scheme.CodingSchemeName = "dts measurement names"
        scheme.CodingSchemeResponsibleOrganization = "dts"
        sr.CodingSchemeIdentificationSequence = [scheme]
    return finish(sr, ctx, "sr", index)


def build_text_report(doc: ResultsDocument, index: InputIndex, ctx: RunContext,
                      series: tuple[str, int]) -> Dataset | None:
    lines = text_lines(doc)
    if not lines:
        return None
    root = hd.sr.ContainerContentItem(name=REPORT)
    root.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=FINDING, value=line,
                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
         for line in lines], is_root=False)
    try:
        sr = hd.sr.EnhancedSR(
            evidence=index.all_headers(), content=root, series_instance_uid=series[0],
            series_number=series[1], sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="dts", is_complete=True,
            previous_versions=ctx.previous_srs("text") or None)
    except (ValueError, TypeError) as exc:
        raise BuildError(doc.file, "findings", f"no valid SR could be built: {exc}") from None
    return finish(sr, ctx, "text", index)
