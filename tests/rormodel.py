"""A model image in the predecessor's ``ror`` contract, for tests with the real engine.

It is tagged as the seed configuration's ``segm_ec_vibe:latest`` and answers to its call
string ``python /app/segm.py /data``: ``/bin/python`` runs the script with busybox's sh.
The script records what it sees (the /data layout, the symbolic links, descr.json,
ROR_CONT_OPTIONS, its argv, whether /data is writable, the network) into /output, writes
``output/output.json`` and, when the options carry a base64 ``payload``, that DICOM file
as its result. ``mode`` in the options: ``ok`` or ``bad-json`` (records missing fields).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

from tests.plugins.engine import BUSYBOX, Engine

ROR_IMAGE = "localhost/segm_ec_vibe:latest"

SEGM = r"""#!/bin/sh
out=/output
echo "$@" > $out/argv.txt
(cd /data && find . | sort) > $out/layout.txt
find /data/input_view_dicom_series -type l | sort | while read -r l; do
    echo "${l#/data/} -> $(readlink "$l")"; done > $out/links.txt
cat /data/input_view_dicom_series/*/*/*/* > /dev/null && echo links-readable >> $out/links.txt
cp /data/descr.json $out/descr-seen.json
printf '%s' "$ROR_CONT_OPTIONS" > $out/options.txt
env | sort > $out/env.txt
if touch /data/x 2>/dev/null; then echo data-writable > $out/ro.txt;
else echo data-read-only > $out/ro.txt; fi
ls /sys/class/net > $out/net.txt
opt() { echo "$ROR_CONT_OPTIONS" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
payload=$(opt payload)
[ -n "$payload" ] && echo "$payload" | base64 -d > $out/result.dcm
pid=$(sed -n 's/.*"PatientID": "\([^"]*\)".*/\1/p' /data/descr.json | head -n 1)
n=$(ls /data/input | wc -l)
case "$(opt mode)" in
bad-json)
    echo '{"tumor": {"record_id": "x"}}' > $out/output.json ;;
*)
    printf '{"tumor": {"record_id": "%s", "event_name": "baseline", "field_name": "tumor_size", "value": "42.5"}, "files": {"record_id": "%s", "event_name": "baseline", "field_name": "num_files", "value": %s}}\n' "$pid" "$pid" "$n" > $out/output.json ;;
esac
echo "segm: done"
"""


def _rootfs() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name: str, data: bytes | None = None, mode: int = 0o755,
                link: str | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.mode = mode
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "app", "data", "output", "proc", "sys", "dev", "run"):
            add(d)
        add("tmp", mode=0o1777)
        add("bin/busybox", Path(BUSYBOX).read_bytes())
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                add(f"bin/{applet}", link="busybox")
        add("bin/python", b'#!/bin/sh\nexec /bin/sh "$@"\n')
        add("app/segm.py", SEGM.encode())
        add("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
            0o644)
        add("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
    return buf.getvalue()


def build_ror_image(engine: Engine, folder: Path) -> str:
    """Import the image into the engine's storage (once per session is enough)."""
    tar = folder / "ror-rootfs.tar"
    tar.write_bytes(_rootfs())
    subprocess.run(engine.podman + ["import", str(tar), ROR_IMAGE], check=True,
                   capture_output=True, env=engine.podman_env, timeout=120)
    return ROR_IMAGE
