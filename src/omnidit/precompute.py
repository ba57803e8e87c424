"""Cache latents and text embeddings once, so that training reads them instead of running the encoders.

A cache is a folder ``OUT_DIR/<key>/`` whose key is a hash of every setting that changes the cached
values (``cache_fields``): codec, text encoder, storage dtype, data name, resolution, which samples,
and any preprocessing. A changed setting gives a new key, so a stale cache is never reused.

```
OUT_DIR/<key>/
  meta.json                  fields, count, shapes, shard list, omnidit version
  shard-00000.safetensors    latents (n, c, h, w); labels (n,) int64; source_index (n,) int64;
                             txt (T, C) = every sample's unpadded text tokens, concatenated;
                             txt_offsets (n + 1,) int64 (sample j owns txt[off[j]:off[j+1]]);
                             pooled (n, P); header metadata "captions" = JSON list of n strings
  null.safetensors           txt (L, C), pooled (P,) of the empty prompt (with a text encoder)
```

Tensors are stored in ``dtype`` (float32 by default, so a cache reproduces the encoders exactly;
float16 / bfloat16 halve the disk and memory cost) and read back as float32. Text tensors are
absent when there is no text encoder. The folder is written as ``<key>.tmp`` and renamed when
complete, so a crash never leaves a half cache under the real name.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from omnidit import __version__
from omnidit.checkpoint import publish_folder
from omnidit.codecs import LatentCodec, dtype_name, resolve_dtype
from omnidit.condition import Condition
from omnidit.data import batch_from_indices
from omnidit.errors import OmniditError

FORMAT = "omnidit-latent-cache/1"
SHARD_SIZE = 4096
_HINT = "run 'omnidit precompute' with the current settings to build the cache"


def _describe_indices(indices: Sequence[int]) -> dict:
    """A short, exact JSON description of which samples are cached: a range, or a count and hash."""
    indices = [int(i) for i in indices]
    if not indices:
        raise OmniditError("precompute needs at least one sample index")
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return {"start": indices[0], "stop": indices[0] + len(indices)}
    digest = hashlib.sha256(json.dumps(indices).encode()).hexdigest()
    return {"count": len(indices), "sha256": digest}


def cache_fields(codec_name: str, text_encoder_name: str | None, dtype: torch.dtype | str, data_name: str,
                 width: int, height: int, indices: Sequence[int], preprocessing: dict | None = None) -> dict:
    """Every setting that changes the cached values, as a canonical JSON-able dict.

    ``codec_name`` / ``text_encoder_name`` are the ``name`` attributes of the codec and the text
    encoder (None or "none" without one); ``width`` / ``height`` are in pixels; ``preprocessing``
    holds anything else the data depends on (seed, held-out pairs, crop mode, ...).
    """
    return {
        "format": FORMAT,
        "codec": str(codec_name),
        "text_encoder": "none" if text_encoder_name is None else str(text_encoder_name),
        "dtype": dtype_name(dtype),
        "data": str(data_name),
        "width": int(width),
        "height": int(height),
        "indices": _describe_indices(indices),
        # a JSON round trip turns tuples into lists, so equal settings compare equal after reading back
        "preprocessing": json.loads(json.dumps(preprocessing or {}, sort_keys=True)),
    }


def _digest(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]  # meta.json keeps the full fields


def cache_key(codec_name: str, text_encoder_name: str | None, dtype: torch.dtype | str, data_name: str,
              width: int, height: int, indices: Sequence[int], preprocessing: dict | None = None) -> str:
    """The folder name of the cache for these settings (a sha256 prefix of ``cache_fields``)."""
    return _digest(cache_fields(codec_name, text_encoder_name, dtype, data_name, width, height, indices,
                                preprocessing))


def _encode_shard(dataset, codec: LatentCodec, text_encoder, indices: list[int], dtype: torch.dtype,
                  batch_size: int, bar) -> tuple[dict[str, Tensor], list[str]]:
    """Encode one shard's samples -> (tensors to save, captions)."""
    latents, labels, txt, lengths, pooled, captions = [], [], [], [], [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        images, caps, labs = batch_from_indices(dataset, idx)
        latents.append(codec.encode(images).cpu())  # (B, c, h, w)
        labels.append(labs)
        captions += caps
        if text_encoder is not None:
            cond = text_encoder.encode(caps).to("cpu")
            n = cond.txt_mask.sum(1).tolist()  # tokens per caption; padding is at the end
            txt += [cond.txt[j, : n[j]] for j in range(len(caps))]  # (L_j, C) each
            lengths += n
            pooled.append(cond.pooled)
        bar.update(len(idx))
    tensors = {"latents": torch.cat(latents), "labels": torch.cat(labels).long(),
               "source_index": torch.tensor(indices, dtype=torch.long)}
    if text_encoder is not None:
        tensors["txt"] = torch.cat(txt)  # (T, C) packed
        tensors["txt_offsets"] = torch.tensor([0] + lengths).cumsum(0)  # (n + 1,)
        tensors["pooled"] = torch.cat(pooled)
    for name in ("latents", "txt", "pooled"):
        if name in tensors:
            tensors[name] = tensors[name].to(dtype).contiguous()
            if not torch.isfinite(tensors[name]).all():  # e.g. float16 overflow, or a VAE gone wrong
                raise OmniditError(f"the cached {name} hold non-finite values in {dtype_name(dtype)}",
                                   hint="store the cache in float32 or bfloat16")
    return tensors, captions


def _check_inputs(dataset, codec: LatentCodec, text_encoder, fields: dict,
                  indices: Sequence[int] | None) -> list[int]:
    """The sample indices to encode, once the objects are known to match ``fields``."""
    if fields.get("format") != FORMAT:
        raise ValueError("fields must come from omnidit.precompute.cache_fields")
    encoder_name = "none" if text_encoder is None else text_encoder.name
    for name, have in (("codec", codec.name), ("text_encoder", encoder_name), ("width", dataset.width),
                       ("height", dataset.height)):
        if fields[name] != have:
            raise ValueError(f"fields say {name}={fields[name]!r} but the objects given have {have!r}")
    if getattr(codec, "sample", False):
        raise OmniditError("a cache holds deterministic latents, but this codec samples from the VAE posterior",
                           hint="load the codec with sample=False for precompute")
    if indices is None:
        if "start" not in fields["indices"]:
            raise ValueError("these fields describe a non-contiguous selection: pass its indices too")
        indices = range(fields["indices"]["start"], fields["indices"]["stop"])
    if _describe_indices(indices) != fields["indices"]:
        raise ValueError("the indices given are not the ones the fields describe")
    if dataset.num_samples is not None and not all(0 <= i < dataset.num_samples for i in indices):
        raise OmniditError(f"the cache asks for samples {fields['indices']} but the dataset has "
                           f"{dataset.num_samples}", hint="cache at most the dataset's samples")
    return [int(i) for i in indices]


def precompute(dataset, codec: LatentCodec, text_encoder, out_dir: str | Path, fields: dict,
               indices: Sequence[int] | None = None, batch_size: int = 64, progress: bool = True,
               overwrite: bool = False, shard_size: int = SHARD_SIZE) -> Path:
    """Encode ``dataset`` samples with ``codec`` and ``text_encoder`` (or None) into ``out_dir/<key>/``.

    ``fields`` comes from ``cache_fields`` and sets the samples and the storage dtype; its codec,
    text encoder and resolution must match the objects passed. ``indices`` is needed only when
    ``fields`` describe a non-contiguous selection (a range is stored as such). An existing
    complete cache with these fields is returned as is unless ``overwrite``. Returns the folder.
    """
    indices = _check_inputs(dataset, codec, text_encoder, fields, indices)
    key = _digest(fields)
    out_dir = Path(out_dir)
    final, tmp = out_dir / key, out_dir / f"{key}.tmp"
    if (final / "meta.json").is_file() and not overwrite:
        try:
            if CachedDataset(final).fields == fields:
                return final
        except OmniditError:
            pass  # unreadable: build it again
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crashed run
    tmp.mkdir(parents=True)
    dtype = resolve_dtype(fields["dtype"])
    shards, shapes = [], {}
    with tqdm(total=len(indices), disable=not progress, unit="sample", desc="precompute") as bar:
        for s, start in enumerate(range(0, len(indices), shard_size)):
            tensors, captions = _encode_shard(dataset, codec, text_encoder, indices[start : start + shard_size],
                                              dtype, batch_size, bar)
            name = f"shard-{s:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"captions": json.dumps(captions)})
            shards.append({"file": name, "count": len(captions)})
            shapes = {"latent_shape": list(tensors["latents"].shape[1:]),
                      "txt_dim": tensors["txt"].shape[1] if "txt" in tensors else None,
                      "pooled_dim": tensors["pooled"].shape[1] if "pooled" in tensors else None}
    meta = {"format": FORMAT, "omnidit_version": __version__, "key": key, "fields": fields,
            "count": len(indices), **shapes, "image_channels": dataset.channels,
            "downsample": codec.downsample, "num_classes": dataset.num_classes, "shards": shards}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if text_encoder is not None:  # the empty prompt: the null condition for dropout and CFG
        null = text_encoder.encode([""]).to("cpu")
        save_file({"txt": null.txt[0].to(dtype).contiguous(), "pooled": null.pooled[0].to(dtype).contiguous()},
                  str(tmp / "null.safetensors"))
    return publish_folder(tmp, final)


class CachedDataset:
    """A precomputed cache folder, read like the datasets in ``omnidit.data``.

    ``ds[i]`` -> {"latent": (c, h, w), "caption": str, "label": int, "txt": (L_i, C), "pooled": (P,)},
    float32 (no "txt" / "pooled" when the cache has no text). ``channels``, ``height`` and ``width``
    describe the latents; ``num_samples`` is the number of cached samples.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.meta = json.loads((self.directory / "meta.json").read_text())
            if self.meta.get("format") != FORMAT:
                raise ValueError(f"format {self.meta.get('format')!r} is not {FORMAT!r}")
            self.fields: dict = self.meta["fields"]
            self.num_samples: int = self.meta["count"]
            self.channels, self.height, self.width = self.meta["latent_shape"]
            self.num_classes: int = self.meta["num_classes"]
            self.has_text = self.meta["txt_dim"] is not None
            self._starts = [0]  # first sample of each shard
            for shard in self.meta["shards"]:
                self._starts.append(self._starts[-1] + shard["count"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise OmniditError(f"cannot read the cache in {self.directory}: {e}", hint=_HINT) from e
        self._shards: dict[int, tuple] = {}  # shard -> (safe_open handle, offsets, labels, captions)

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"CachedDataset({str(self.directory)!r}, n={self.num_samples}, latent={self.meta['latent_shape']})"

    def __getstate__(self) -> dict:  # open file handles cannot be copied to DataLoader workers: they reopen
        return {**self.__dict__, "_shards": {}}

    def _shard(self, s: int) -> tuple:
        if s not in self._shards:
            handle = safe_open(str(self.directory / self.meta["shards"][s]["file"]), framework="pt")
            offsets = handle.get_tensor("txt_offsets").tolist() if self.has_text else None
            captions = json.loads(handle.metadata()["captions"])
            self._shards[s] = (handle, offsets, handle.get_tensor("labels").tolist(), captions)
        return self._shards[s]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} is out of range for a cache of {self.num_samples} samples")
        s = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[s]
        handle, offsets, labels, captions = self._shard(s)
        item = {"latent": handle.get_slice("latents")[j].float(), "caption": captions[j], "label": labels[j]}
        if self.has_text:
            item["txt"] = handle.get_slice("txt")[offsets[j] : offsets[j + 1]].float()  # (L_i, C)
            item["pooled"] = handle.get_slice("pooled")[j].float()  # (P,)
        return item

    def null_condition(self) -> Condition:
        """The empty prompt's encoding, batch 1 (for condition dropout and CFG); empty without text."""
        if not self.has_text:
            return Condition()
        with safe_open(str(self.directory / "null.safetensors"), framework="pt") as f:
            txt, pooled = f.get_tensor("txt").float(), f.get_tensor("pooled").float()
        return Condition(txt=txt[None], txt_mask=torch.ones(1, txt.shape[0], dtype=torch.bool), pooled=pooled[None])

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, list[str], Tensor, Condition]:
        """Collate -> (latents (B, c, h, w), captions, labels (B,) int64, Condition(txt, txt_mask, pooled)).

        Text is zero-padded to the longest sample, as ``TextEncoder.encode`` pads it; the Condition
        is empty when the cache has no text.
        """
        items = [self[i] for i in indices]
        if not items:
            raise ValueError("batch needs at least one index")
        latents = torch.stack([it["latent"] for it in items])
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        cond = Condition()
        if self.has_text:
            length = max(it["txt"].shape[0] for it in items)
            cond.txt = torch.zeros(len(items), length, self.meta["txt_dim"])  # (B, L, C)
            cond.txt_mask = torch.zeros(len(items), length, dtype=torch.bool)  # (B, L)
            for b, it in enumerate(items):
                cond.txt[b, : it["txt"].shape[0]] = it["txt"]
                cond.txt_mask[b, : it["txt"].shape[0]] = True
            cond.pooled = torch.stack([it["pooled"] for it in items])  # (B, P)
        return latents, [it["caption"] for it in items], labels, cond


def _differences(cached: dict, wanted: dict) -> list[str]:
    return [f"{k} (cache: {cached.get(k)!r}, now: {wanted.get(k)!r})"
            for k in sorted(set(cached) | set(wanted)) if cached.get(k) != wanted.get(k)]


def open_cache(out_dir: str | Path, fields: dict) -> CachedDataset:
    """The cache in ``out_dir`` made with exactly ``fields`` (from ``cache_fields``).

    When there is none, the error names the settings in which the closest cache on disk differs.
    Half-written ``.tmp`` folders are never read.
    """
    out_dir = Path(out_dir)
    final = out_dir / _digest(fields)
    if (final / "meta.json").is_file():
        ds = CachedDataset(final)
        if ds.fields != fields:  # a hash-prefix collision or a hand-edited folder
            raise OmniditError(f"the cache in {final} differs in " + "; ".join(_differences(ds.fields, fields)),
                               hint=_HINT)
        return ds
    candidates = []
    if out_dir.is_dir():
        for d in sorted(out_dir.iterdir()):
            if d.suffix in (".tmp", ".old") or not (d / "meta.json").is_file():
                continue
            try:
                candidates.append((d, _differences(CachedDataset(d).fields, fields)))
            except OmniditError:
                continue  # not a cache of this format: ignore it
    if not candidates:
        raise OmniditError(f"no precomputed cache in {out_dir} for these settings", hint=_HINT)
    closest, diffs = min(candidates, key=lambda c: len(c[1]))
    raise OmniditError(f"no precomputed cache in {out_dir} for these settings; the closest, {closest.name}, "
                       "differs in " + "; ".join(diffs), hint=_HINT)


def fields_for_config(config, dataset) -> dict:
    """The cache fields that a training config implies (codec, encoder, size, samples, data settings)."""
    from omnidit.codecs import codec_name
    from omnidit.text import text_encoder_name

    dc = config.data
    count = dc.cache_samples or dataset.num_samples
    if not count:
        raise OmniditError(f"the '{dc.name}' data is infinite: say how many samples to cache",
                           hint="set data.cache_samples, e.g. data.cache_samples=100000")
    encoder = None if config.text.encoder == "none" else text_encoder_name(config.text.encoder,
                                                                            config.text.max_length)
    preprocessing = {"seed": dc.seed, "held_out": sorted(dc.held_out), "path": str(Path(dc.path).resolve())
                     if dc.path else ""}
    if dc.scene_kinds:  # only when set, so caches written before this key existed stay valid
        preprocessing["scene_kinds"] = dict(sorted(dc.scene_kinds.items()))
    if dc.new_shapes:  # the same
        preprocessing["new_shapes"] = sorted(dc.new_shapes)
    if dc.new_shape_weight != 1.0:
        preprocessing["new_shape_weight"] = dc.new_shape_weight
    if dc.pair_weights:
        preprocessing["pair_weights"] = dc.pair_weights  # normalised by the config
    return cache_fields(codec_name(dc.codec, dc.codec_dtype), encoder, torch.float32, dc.name, dc.width,
                        dc.height, range(count), preprocessing)


def precompute_for_config(config, progress: bool = True) -> Path:
    """Build the data, codec and text encoder a config names and fill its ``data.cache_dir``."""
    from omnidit.codecs import load_codec
    from omnidit.data import build_dataset
    from omnidit.pipeline import resolve_device
    from omnidit.text import load_text_encoder

    dc = config.data
    if not dc.cache_dir:
        raise OmniditError("data.cache_dir is not set", hint="add data.cache_dir=PATH to the config or command")
    if dc.frames > 1 or dc.name == "shapes_video":
        raise OmniditError("omnidit precompute caches images; clips train from the data directly",
                           hint="train the video config without data.cache_dir")
    device = resolve_device(config.train.device)
    dataset = build_dataset(dc.name, dc.width, dc.height, seed=dc.seed, path=dc.path, held_out=dc.held_out,
                            scene_kinds=dc.scene_kinds, new_shapes=dc.new_shapes,
                            new_shape_weight=dc.new_shape_weight, pair_weights=dc.pair_weights)
    codec = load_codec(dc.codec, dataset.channels, device, dc.codec_dtype)
    encoder = None if config.text.encoder == "none" else load_text_encoder(config.text.encoder,
                                                                           config.text.max_length, device)
    return precompute(dataset, codec, encoder, dc.cache_dir, fields_for_config(config, dataset), progress=progress)
