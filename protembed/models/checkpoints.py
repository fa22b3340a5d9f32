"""Reading Hub-layout checkpoint directories: architecture detection and strict, lazy loading.

A checkpoint directory holds `config.json` plus weights, tried in this order:
`model.safetensors`, `model.safetensors.index.json` + shards, `pytorch_model.bin`,
`pytorch_model.bin.index.json` + shards. Pickled `.bin` files are read only through
`torch.load(weights_only=True)`. Tensors are read one at a time from memory-mapped files and
placed straight into the model in the requested dtype and device, so loading never holds a
second full copy of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open

from protembed.cache import default_cache_dir, user_path
from protembed.errors import CheckpointError
from protembed.models import amplify, esm2
from protembed.models.encoder import Encoder, EncoderConfig
from protembed.registry import lookup

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CONFIG_FILE = "config.json"


def family_module(family: str) -> ModuleType:
    return {"esm2": esm2, "amplify": amplify}[family]


def detect_family(cfg: dict) -> str | None:
    """'esm2', 'amplify' or None, from a `config.json` dict."""
    model_type = str(cfg.get("model_type", "")).lower()
    archs = [str(a) for a in cfg.get("architectures") or []]
    if model_type == "esm" or any(a.startswith("Esm") for a in archs):
        return "esm2"
    if model_type == "amplify" or any(a.upper().startswith("AMPLIFY") for a in archs):
        return "amplify"
    return None


def config_from_dict(cfg: dict, where: str) -> EncoderConfig:
    """EncoderConfig from a Hub `config.json` dict; CheckpointError if not ESM-2 or AMPLIFY."""
    family = detect_family(cfg)
    if family is None:
        kind = cfg.get("model_type") or cfg.get("architectures") or "unknown"
        raise CheckpointError(where, f"not an ESM-2 or AMPLIFY checkpoint (model_type {kind!r})")
    try:
        return family_module(family).config_from_hub(cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(where, f"unsupported {family} config: {exc}") from None


def read_config(path: Path) -> EncoderConfig:
    """EncoderConfig of a checkpoint directory."""
    cfg_path = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(str(path), "no config.json (not a Hugging Face checkpoint directory)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(str(cfg_path), f"cannot read config: {exc}") from None
    return config_from_dict(cfg, str(path))


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, shards resolved, in the preferred format."""
    path = Path(path)
    for name in WEIGHT_FILES:
        f = path / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(str(f), f"bad shard index: {exc}") from None
            missing = [s for s in shards if not (path / s).exists()]
            if missing:
                raise CheckpointError(str(path), f"missing weight shards: {', '.join(missing)}")
            return [path / s for s in shards]
        return [f]
    raise CheckpointError(str(path), "no weights found (model.safetensors or pytorch_model.bin)")


class WeightReader:
    """Lazy access to the tensors of one or more weight files, by key."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, int] = {}
        self._handles: list = []
        for n, f in enumerate(files):
            try:
                if f.suffix == ".safetensors":
                    handle = safe_open(str(f), framework="pt", device="cpu")
                    keys = list(handle.keys())
                else:
                    handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    if not isinstance(handle, dict):
                        raise CheckpointError(str(f), "not a state dict")
                    keys = list(handle)
            except CheckpointError:
                raise
            except Exception as exc:  # safetensors/pickle raise many types on corrupt files
                raise CheckpointError(str(f), f"corrupt or truncated weights ({exc})") from None
            self._handles.append(handle)
            for k in keys:
                self._where[k] = n

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        h = self._handles[self._where[key]]
        if isinstance(h, dict):
            return tuple(h[key].shape)
        return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        h = self._handles[self._where[key]]
        try:
            return h[key] if isinstance(h, dict) else h.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(key, f"corrupt or truncated weights ({exc})") from None


def _plan(reader: WeightReader, config: EncoderConfig, where: str) -> tuple[dict[str, list[str]], str | None]:
    """Our name -> source keys (normalised names resolved to file keys) and the rotary key."""
    fam = family_module(config.family)
    by_norm = {fam.normalize_key(k): k for k in reader.keys()}
    if config.family == "amplify":
        mapping = amplify.key_map(config.n_layers, config.bias)
    else:
        mapping = esm2.key_map(config.n_layers)
    wanted = {src for srcs in mapping.values() for src in srcs}
    missing = sorted(s for s in wanted if s not in by_norm)
    rotary = sorted(k for k in by_norm if fam.is_rotary_key(k))
    unexpected = sorted(
        k for k in by_norm if k not in wanted and not fam.is_rotary_key(k) and not fam.is_ignored_key(k)
    )
    if missing or unexpected:
        raise CheckpointError(where, "weights do not match config.json", missing, unexpected)
    plan = {ours: [by_norm[s] for s in srcs] for ours, srcs in mapping.items()}
    return plan, (by_norm[rotary[0]] if rotary else None)


def _check_shapes(reader: WeightReader, plan: dict[str, list[str]], model: Encoder, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = []
    for ours, srcs in plan.items():
        shapes = [reader.shape(s) for s in srcs]
        got = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
        if got != expected[ours]:
            bad.append(f"{srcs[0]} {list(got)} != {list(expected[ours])}")
    if bad:
        raise CheckpointError(where, "weight shapes do not match config.json: " + "; ".join(bad[:4]))


def _build(config: EncoderConfig) -> Encoder:
    return family_module(config.family).build(config)


def _open_checked(path: Path) -> tuple[Encoder, WeightReader, dict[str, list[str]], str | None]:
    """A meta-device model of the checkpoint's config, its weights opened lazily, and the plan
    mapping every parameter to its source keys (architecture, keys and shapes checked)."""
    config = read_config(path)
    reader = WeightReader(weight_files(path))
    plan, rotary_key = _plan(reader, config, str(path))
    with torch.device("meta"):
        model = _build(config)
    _check_shapes(reader, plan, model, str(path))
    return model, reader, plan, rotary_key


def verify_checkpoint(path: Path) -> EncoderConfig:
    """Check architecture, every key and every shape of a checkpoint without loading the weights."""
    return _open_checked(Path(path))[0].config


def iter_tensors(reader: WeightReader, plan: dict[str, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    for ours, srcs in plan.items():
        parts = [reader.get(s) for s in srcs]
        yield ours, parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def load_checkpoint(
    path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Encoder:
    """Load a checkpoint directory into an `Encoder` in eval mode, strictly and memory-mapped."""
    try:
        model, reader, plan, rotary_key = _open_checked(Path(path))
        state = {}
        for name, tensor in iter_tensors(reader, plan):
            state[name] = tensor.to(device=device, dtype=dtype)
    except CheckpointError as exc:
        repo = hub_cache_repo(Path(path))
        if repo is not None:  # `download` verified it: the cached copy was damaged since
            info = lookup(repo)
            name = info.name if info else repo
            exc.args = (f"{exc}; `protembed download {name} --force` fetches it again",)
        raise
    model.load_state_dict(state, strict=True, assign=True)
    if rotary_key is not None:
        model.rotary.set_inv_freq(reader.get(rotary_key))
    return model.eval().requires_grad_(False)


def hub_cache_repo(path: Path) -> str | None:
    """The repo id when `path` is a snapshot in a Hugging Face cache (`models--ORG--NAME/snapshots/C`)."""
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def random_model(
    config: EncoderConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Encoder:
    """A model of the given shape with random weights (for benchmarks and tests)."""
    gen = torch.Generator().manual_seed(seed)
    model = _build(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def registry_hub_config(name: str) -> dict:
    """A `config.json` like the published one of a registry model (`esm2-650m`, ...)."""
    from protembed.registry import MODELS

    info = MODELS[name]
    common = {
        "hidden_size": info.d_model,
        "num_hidden_layers": info.n_layers,
        "num_attention_heads": info.n_heads,
    }
    if info.family == "esm2":
        return {"architectures": ["EsmForMaskedLM"], "model_type": "esm", "intermediate_size": info.d_ffn,
                "vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32, "position_embedding_type": "rotary",
                "token_dropout": True, "emb_layer_norm_before": False, "layer_norm_eps": 1e-5,
                "max_position_embeddings": 1026, "torch_dtype": "float32", **common}  # fmt: skip
    return {"architectures": ["AMPLIFY"], "model_type": "AMPLIFY", "intermediate_size": 4 * info.d_model,
            "vocab_size": 27, "pad_token_id": 0, "mask_token_id": 2, "bos_token_id": 3, "eos_token_id": 4,
            "unk_token_id": 1, "rms_norm": True, "norm_eps": 1e-5, "hidden_act": "SwiGLU", "att_bias": False,
            "ffn_bias": False, "layer_norm_after_embedding": False, "layer_norm_before_last_layer": True,
            "max_length": 2048, "torch_dtype": "float32", **common}  # fmt: skip


def registry_config(name: str) -> EncoderConfig:
    """EncoderConfig of a registry model (`esm2-650m`, `amplify-120m`, ...) at its published shape."""
    from protembed.registry import MODELS

    cfg = config_from_dict(registry_hub_config(name), name)
    assert cfg.d_ffn == MODELS[name].d_ffn, (cfg.d_ffn, MODELS[name].d_ffn)  # AMPLIFY derives it
    return cfg


def local_checkpoint(model: str, revision: str | None = None) -> Path | None:
    """The resolved folder when `model` names a local checkpoint directory, else None.

    An empty name is an UnknownModelError (not the current folder); a `revision` with a local
    folder is an OptionError (revisions are the Hub's).
    """
    from protembed.errors import OptionError, UnknownModelError
    from protembed.registry import MODELS

    if not model.strip():
        raise UnknownModelError(model, list(MODELS), "the model name is empty")
    path = user_path(model)  # None for ~name of an unknown user: not a folder here
    if path is None or not path.is_dir():
        return None
    if revision is not None:
        raise OptionError(f"--revision names a Hub revision; {model} is a local directory")
    return path.resolve()


def weights_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 over a local checkpoint's weight files (its `model_revision`).

    Hashing tens of GB on every run would dominate start-up, so the digest is remembered per
    (file, size, modification and change times) in `<cache>/weights-sha256.json`, where `<cache>`
    is `cache_dir` or protembed's default cache.
    """
    return memo_sha256(weight_files(path), cache_dir)


def memo_sha256(files: list[Path], cache_dir: Path | None = None) -> str:
    """`sha256:<hex>` over the bytes of `files` in order, remembered per (file, size, modification
    and change times) in `<cache>/weights-sha256.json` (see `weights_sha256`). The change time
    (ctime) is in the key because `cp -p`, `rsync -a` or `touch -r` can give new content the old
    modification time; nothing but the system clock sets the ctime."""
    stats = [(f.resolve(), f.stat()) for f in files]
    key = ";".join(f"{p}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}" for p, s in stats)
    memo_path = (cache_dir or default_cache_dir()) / "weights-sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return str(memo[key])
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    memo[key] = "sha256:" + digest.hexdigest()
    tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}")
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    except OSError:  # a read-only cache, or another user's memo: only costs hashing again next time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return str(memo[key])
