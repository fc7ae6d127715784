"""Owns the shape of ``job.json``: the typed record every stage reads and writes.

``dts.spool`` owns the file (``Job.read()`` / ``Job.write()``); this module owns what is
in it. A record is a plain JSON object typed as a ``TypedDict(total=False)``: every key
may be absent, mypy checks each key name and value type at every access, and a key this
dts does not know (one a newer dts wrote, or a site's own script) stays in the dict and
so survives a read, change, write by any stage. Nested objects keep unknown keys the same
way. Values are what JSON gives: strings, numbers, booleans, null, lists, objects; times
are ISO-8601 UTC strings (``spool.isotime()``, ``2026-11-26T10:57:00.123456Z``).

Keys, grouped by who writes them. They are a contract that scripts and outside tests rely
on (the README's job folder, docs/architecture.md): none is renamed or removed.

Every write (``Job.write``):
  ``id`` (str)             the job id, the folder's name; rewritten on every write.
  ``updated_at`` (str)     time of the last write.

Identity, written once when the study is published by ``dts receive`` (``receiver.job_data``)
or ``dts import`` (``importer``); a fan-out run job copies them (``IDENTITY_KEYS`` below):
  ``study_uid`` (str)      StudyInstanceUID (validated at the network boundary).
  ``patient_id`` (str|null)  PatientID of the first instance; the run stage's output check
                           compares results against it (never in log lines).
  ``accession`` (str|null) AccessionNumber; copied into every event of the job.
  ``calling_ae`` (str|null)  AE title that sent the study (``@sender`` resolves to it).
  ``called_ae`` (str|null)   AE title the study was sent to (streams' ``called_ae``).
  ``peer`` (str|null)      IP address of the sending node (null for an import).
  ``peer_port`` (int|null) its TCP port.
  ``received_at`` (str|null) when the first instance arrived (import: when imported).
  ``completed_at`` (str)   when the study counted as complete and was published.
  ``last_received_at`` (str|null)  when its last instance was written (the newest file in
                           ``input/``): where the turnaround starts (``dts.index``).
  ``source`` (str)         ``"dicom"`` (received), ``"stow"`` (STOW-RS, ``dts.stow``: the
                           calling AE title is ``[stow] source``) or ``"import"`` (``dts import``).
Written with the identity, not copied to run jobs:
  ``sources`` (list of Source)  every connection that carried the study, only when more
                           than one association did (receiver).
  ``duplicates`` (int)     instances received again with a SOP Instance UID already held;
                           only when there were any (receiver).

Counts and routing:
  ``instances`` (int)      instances in ``input/`` (receiver/import; a run job: those of
                           its selection, classifier).
  ``series`` (object str -> int)  SeriesInstanceUID -> instances in ``input/<uid>/``
                           (receiver/import; a run job: its selected series, classifier).
  ``stream`` (str|null)    the stream a run/send job belongs to (classifier sets it on run
                           jobs; null until classified). ``dts send`` also accepts an object
                           ``{"name", "destinations"}`` here (a job that carries its stream's
                           settings itself, made by a tool); no dts stage writes that form.
  ``attempts`` (int)       tries so far: counted by ``Spool.recover`` (a dead worker),
                           the worker loop's unexpected errors, the run stage's engine
                           failures and every send try; ``dts requeue`` resets it to 0.
  ``error`` (str|null)     why the last try failed (the run stage appends the log's last
                           lines); removed or null when the job goes on. Any stage.
  ``failed_at`` (str)      when the classify or send stage moved it to ``failed/``.
  ``recovered_at`` (str)   when ``Spool.recover`` last put it back from a dead worker's ``cur/``.
  ``reason`` (str)         no stage of this dts writes it; ``dts requeue`` clears it with the
                           other last-try keys.

Classify stage (``dts.classifier``), on the job it classified:
  ``classified_at`` (str)  when it was last classified.
  ``classification`` (object stream -> StreamVerdict)  every stream's verdict.
  ``unmatched`` (object str -> list of str)  why nothing ran: stream -> reasons, or
                           ``{"own-result": [producing job ids]}`` for this station's own
                           results; removed when a later classification matches.
  ``children`` (list of str)   run job ids made from it, over every classification.
  ``streams`` (list of str)    streams that matched in the last classification.
  ``fanout_pending`` (object stream -> str)  the planned child ids while the fan-out is
                           under way (a classifier that dies adopts them); removed once the
                           job is in ``done/``. For a ``per = "series"`` stream the key is
                           ``<stream>/<SeriesInstanceUID>`` and the child ``J.<stream>.s<n>``.
and on each run job it creates:
  ``parent`` (str)         the job it was classified from.
  ``selection`` (object str -> list of str)  selection name -> SeriesInstanceUIDs; the
                           container's ``/input/<name>/<uid>/`` is built from it.
  ``created_at`` (str)     when the run job was made.

Run stage (``dts.runner``):
  ``running`` (RunningInfo)  what is running for the job now, so that the next start after
                           a ``kill -9`` stops the orphan; removed when the run ends.
  ``run`` (RunInfo)        provenance and result of the last run.
  ``priors`` (PriorsRecord)  the prior studies fetched for a stream with ``priors``
                           (``dts.priors``): source, method, and per study its UID, date,
                           description, instance counts; the files are in ``prior/``.
  ``outputs`` (list of OutputEntry)  the validated DICOM results the sender sends.
  ``other_files`` (list of str)  non-DICOM files of ``output/``, relative to it.
  ``results`` (list of ResultEntry)  the values the model reported (``results.json`` in
                           the dts contract, ``output.json`` in the ror contract;
                           ``dts.results``, docs/results.md); only when there were any.
  ``built`` (list of BuiltEntry)  the DICOM objects dts built from results.json
                           (``dts.builders``; also in ``outputs``); a re-run reads it to
                           reference the SR it replaces; only when there were any.
  ``failure`` (Failure)    the structured reason of a run that failed; removed on success.
  ``last_error`` (str)     the last temporary failure (container engine unreachable).
  ``orphans_stopped`` (list of str)  processes/containers of dead runs stopped on recovery,
                           e.g. ``"process group 1234"``, ``"container 3f9a..."``.
  ``slurm`` (SlurmInfo)    a stream with ``executor = "slurm"``: the cluster job of this run
                           (``dts.slurm``): its name, token, Slurm job id, state, node and
                           times; written before sbatch is called (so an interrupted
                           submission is found again) and kept after the run for ``dts show``.
  ``slurm_history`` (list of SlurmInfo)  earlier cluster jobs of this job (run again after
                           NODE_FAIL/PREEMPTED/BOOT_FAIL, or requeued by hand and scancelled).

Send stage (``dts.sender``):
  ``destinations`` (object name -> DestinationState)  per-destination delivery state; a
                           retry sends only what is missing; objects a destination's
                           ``filter`` kept out are its ``skipped``. ``dts requeue`` resets it.
                           With ``commitment = true`` its ``commitment`` holds every storage
                           commitment transaction (``dts.commitment``); status ``waiting``
                           while an answer is out. ``verify = "find"``: ``verified_at``.
  ``next_attempt_at`` (str)  when the next try is due (backoff); absent: due now.
  ``sent_at`` (str)        when every destination had everything.

``dts requeue`` (``dts.requeue``):
  ``requeued`` (list of RequeueEntry)  one entry per manual requeue, oldest first.

Review, shadow and replay (``dts.review``, ``dts.replay``; docs/review.md):
  ``review`` (ReviewEntry)  a review stream's results: ``waiting_since`` when they were
                           published to ``review/new``, then the decision of the person
                           (``decision`` approved|rejected, ``by``, ``at``, ``reason``).
  ``shadow`` (bool)        true on a job whose results are kept in ``done/`` and never
                           sent (a ``shadow = true`` stream's job, or a ``dts replay``
                           without ``--live``).
  ``replay_of`` (str)      on a job made by ``dts replay``: the job whose input it ran again.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict


class Source(TypedDict, total=False):
    """One association that carried part of a study (``sources``; receiver)."""

    calling_ae: str
    called_ae: str
    peer: str
    peer_port: int


class StreamVerdict(TypedDict, total=False):
    """One stream's classification (``classification``)."""

    matched: bool
    reasons: list[str]   # why it did not match (empty when it did)


class RunningInfo(TypedDict, total=False):
    """What runs for a job now (``running``); from the executor's ``started`` callback."""

    executor: str        # "command" or "docker"
    pid: int             # command: the process group leader
    start_time: str | None   # command: the kernel's start time of pid (a recycled pid differs)
    container: str       # docker: the container id
    engine: str          # docker: the engine address (DOCKER_HOST)
    started_at: str      # when the run began
    pid_of_runner: int   # the dts process that started it


class SlurmInfo(TypedDict, total=False):
    """One cluster job of a run (``slurm``, ``slurm_history``; ``dts.slurm``)."""

    name: str            # the Slurm job name, dts-<job id>
    token: str           # its comment is dts:<token>: one per intended run
    job_id: str          # Slurm's job id (absent until sbatch answered)
    state: str           # Slurm's JobState, or SUBMITTING / UNSUBMITTED / VANISHED
    node: str            # the node it ran on
    reason: str          # Slurm's Reason (why pending, why it ended)
    exit_code: int | None  # the processing's exit code (the batch script's exit file)
    partition: str       # [slurm] partition, when given
    sbatch: list[str]    # sbatch's arguments as run
    command: list[str]   # what the batch script runs (podman run ... or the command)
    node_folder: str     # the job's folder as the nodes see it ([slurm] spool_path)
    submitting_at: str   # when it went to run/slurm/ to be submitted
    submitted_at: str    # when sbatch answered with the job id
    started_at: str      # when Slurm reported it running
    ended_at: str        # when it ended (Slurm's EndTime, or when dts saw it ended)
    collected_at: str    # when dts took its result (finished, failed or run again)
    cancelled_at: str    # when dts scancelled it (dts requeue)


class RunInfo(TypedDict, total=False):
    """Provenance and result of the last run (``run``)."""

    executor: str        # "command", "docker" or "slurm"
    runtime: str         # slurm: "podman" (an image) or "command"
    slurm_job_id: str    # slurm: the cluster job
    slurm_state: str     # slurm: its final state (COMPLETED, FAILED, TIMEOUT ...)
    node: str            # slurm: the node it ran on
    command: list[str]   # command: the argv run; docker with contract "ror": the call
    contract: str        # docker: "ror" when the stream runs in the ror contract
    image: str           # docker: the stream's image as configured
    image_id: str        # docker: the image id actually run
    image_digests: list[str]  # docker: its repository digests
    container: str       # docker: the container id
    engine: str          # docker: the engine address
    oom_killed: bool     # docker: the engine said the container ran out of memory
    exit_code: int | None
    duration_seconds: float
    started_at: str
    finished_at: str


class OutputEntry(TypedDict, total=False):
    """One validated DICOM result (``outputs``; ``validate.OutputObject``)."""

    file: str            # relative to output/
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    study_uid: str
    series_uid: str


class ResultEntry(TypedDict, total=False):
    """One value a model reported (``results``; ``dts.results``, docs/results.md)."""

    name: str            # results.json: name; output.json: field_name
    value: str | int | float | bool
    unit: str | None     # results.json only (UCUM-style text, e.g. "mm", "ml")
    source: str          # the file: "results.json" or "output.json"
    series_uid: str      # results.json: the series the value is about, if given
    record_id: str       # output.json: the record's record_id ...
    event_name: str      # ... and event_name (the predecessor's REDCap fields)
    key: str             # output.json: the record's name when it is an object of records


class BuiltEntry(TypedDict, total=False):
    """One object the result builder made (``built``; ``dts.builders.Built``)."""

    kind: str            # sr, text, seg, pdf, sc, kos
    file: str            # relative to output/ (dts-built/...)
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    series_number: int


class ViolationEntry(TypedDict, total=False):
    """One broken output rule (``failure.violations``; ``validate.Violation``)."""

    file: str            # relative to output/
    rule: str            # e.g. "foreign-patient"
    detail: str


class Failure(TypedDict, total=False):
    """Why a run failed (``failure``)."""

    stage: str           # "run"; "review" for results a person rejected (dts.review)
    reason: str          # no-stream, attempts, input, setup, timeout, oom, exit-code,
                         # invalid-output, invalid-results, no-output, engine-unreachable;
                         # rejected (stage review)
                         # slurm: slurm-refused, slurm-unreachable, cancelled, not-shared,
                         # slurm-<state> (deadline, node_fail ... once attempts are used up)
    message: str
    log_tail: str        # last lines of the processing's log ("" when there was no run)
    time: str
    violations: list[ViolationEntry]  # invalid-output only


# "waiting": everything stored, the peer's storage commitment answer (or the N-ACTION's
# commitment_delay) still outstanding (dts.commitment)
SendStatus = Literal["done", "failed", "retry", "waiting"]


class CommitmentTransaction(TypedDict, total=False):
    """One storage commitment request (``destinations.<name>.commitment.<TransactionUID>``)."""

    sent_at: str         # when the N-ACTION went out
    instances: dict[str, str]  # SOP Instance UID -> "pending", "committed", "failed: <reason>"
    answered_at: str     # when the peer's N-EVENT-REPORT arrived
    timed_out_at: str    # when commitment_timeout passed without an answer


class DestinationState(TypedDict, total=False):
    """Delivery to one destination (``destinations.<name>``)."""

    status: SendStatus   # absent: not tried yet (or reset by dts requeue)
    sent: list[str]      # SOP Instance UIDs delivered (a warning status counts)
    failed: dict[str, str]  # SOP Instance UID -> the refusal, e.g. "0xA900" or a reason
    skipped: list[str]   # SOP Instance UIDs the destination's filter kept out
    error: str           # why the destination failed or waits
    via: str             # "@sender" when the stream named it so
    path: str            # folder destination: where the results were put
    commitment: dict[str, CommitmentTransaction]  # Transaction UID -> request and answer
    commit_after: str    # when the N-ACTION is due (commitment_delay after storing)
    verified_at: str     # verify = "find": when a C-FIND found every instance


# The functional form: "from" is a Python keyword.
RequeueEntry = TypedDict("RequeueEntry", {
    "at": str,           # when
    "by": str,           # who (the sudo caller or the login name)
    "host": str,         # on which host
    "from": str,         # where the job was, e.g. "failed" or "send/new"
    "to": str,           # where it went, e.g. "run/new"
}, total=False)


ReviewDecision = Literal["approved", "rejected"]


class ReviewEntry(TypedDict, total=False):
    """A person's look at a review stream's results (``review``; ``dts.review``)."""

    waiting_since: str   # when the job was published to review/new
    decision: ReviewDecision
    by: str              # who decided (the Unix user, --by, or web:<user>)
    at: str              # when
    reason: str          # why (required to reject; optional to approve)


class PriorStudyEntry(TypedDict, total=False):
    """One prior study fetched into ``prior/`` (``priors.studies``; ``dts.priors``)."""

    study_uid: str
    date: str | None         # StudyDate (YYYYMMDD) as the PACS answered
    time: str | None
    description: str | None
    modalities: list[str]
    instances: int
    series: dict[str, int]   # SeriesInstanceUID -> instances


class PriorsRecord(TypedDict, total=False):
    """``priors``: what the run stage fetched for the stream's ``priors`` (``dts.priors``)."""

    source: str              # the destination queried (``priors.from``)
    method: str              # "get" or "move"
    fetched_at: str
    found: int               # studies of the patient the C-FIND answered with (usable ones)
    ignored: int             # C-FIND answers ignored (invalid UIDs, the current study)
    studies: list[PriorStudyEntry]


class JobRecord(TypedDict, total=False):
    """job.json; every key is documented in the module docstring."""

    id: str
    updated_at: str
    study_uid: str
    patient_id: str | None
    accession: str | None
    calling_ae: str | None
    called_ae: str | None
    peer: str | None
    peer_port: int | None
    received_at: str | None
    completed_at: str
    last_received_at: str | None
    source: str
    sources: list[Source]
    duplicates: int
    instances: int
    series: dict[str, int]
    stream: str | dict[str, Any] | None
    attempts: int
    error: str | None
    failed_at: str
    recovered_at: str
    reason: str
    classified_at: str
    classification: dict[str, StreamVerdict]
    unmatched: dict[str, list[str]]
    children: list[str]
    streams: list[str]
    fanout_pending: dict[str, str]
    parent: str
    selection: dict[str, list[str]]
    created_at: str
    running: RunningInfo
    run: RunInfo
    outputs: list[OutputEntry]
    other_files: list[str]
    results: list[ResultEntry]
    built: list[BuiltEntry]
    failure: Failure
    last_error: str
    orphans_stopped: list[str]
    slurm: SlurmInfo
    slurm_history: list[SlurmInfo]
    destinations: dict[str, DestinationState]
    next_attempt_at: str
    sent_at: str
    requeued: list[RequeueEntry]
    review: ReviewEntry
    shadow: bool
    replay_of: str
    priors: PriorsRecord


# The identity keys a fan-out run job copies from its parent, typed so that mypy checks
# each one against JobRecord.
IdentityKey = Literal["study_uid", "patient_id", "accession", "calling_ae", "called_ae",
                      "peer", "peer_port", "received_at", "completed_at", "last_received_at",
                      "source"]
IDENTITY_KEYS: tuple[IdentityKey, ...] = (
    "study_uid", "patient_id", "accession", "calling_ae", "called_ae", "peer", "peer_port",
    "received_at", "completed_at", "last_received_at", "source")

__all__ = ["IDENTITY_KEYS", "CommitmentTransaction", "DestinationState", "Failure", "IdentityKey",
           "JobRecord", "OutputEntry", "PriorStudyEntry", "PriorsRecord", "RequeueEntry",
           "ResultEntry", "ReviewDecision", "ReviewEntry", "RunInfo", "RunningInfo",
           "SendStatus", "SlurmInfo", "Source",
           "StreamVerdict", "ViolationEntry"]
