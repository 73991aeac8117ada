"""MPO's reference log-probs: a frozen model in the step, or a table computed once beforehand.

``mpo.reference: model``: a second set of model chunks with the policy's layout (TP/PP/VPP),
loaded from the starting checkpoint, without gradients or optimizer state, run forward-only
through megatron's pipeline schedule on the step's micro-batches before the training pass.

``mpo.reference: precomputed``: ``megatron-internvl mpo-reference RECIPE.yaml`` runs that model
once over every pair of the preference data (any layout; each data-parallel replica takes every
``dp``-th pair) and writes ``{pair id: (chosen, rejected) summed log-probs}`` to
``mpo.reference_file``. Work is done in chunks of pairs; each finished chunk is a file of its
own, so a crashed run continues where it stopped; the table is written atomically at the end.
The table records what it was computed from (data, checkpoint, template and tokenizer);
training refuses a table whose record differs, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megatron_internvl import checkpoint as ckpt
from megatron_internvl.config import ConfigError, load_config
from megatron_internvl.config.errors import run_reporting
from megatron_internvl.data.build import build_tokenizer, check_data_matches_model
from megatron_internvl.data.media import MediaLoader
from megatron_internvl.data.packing import TwoBudgetPacker, collate_pack
from megatron_internvl.data.preference import PairBuilder, finish_pair_batch, open_preference_sources
from megatron_internvl.data.samples import Skip
from megatron_internvl.models.factory import build_model_chunks
from megatron_internvl.models.pixels import normalize_pixels
from megatron_internvl.parallel import distributed
from megatron_internvl.parallel.data import BroadcastLoader
from megatron_internvl.parallel.sequence import pack_pad_multiple

from ..loss import token_log_probs
from ..step import packed_seq_params, to_device
from .objective import pair_sums

logger = logging.getLogger("megatron_internvl.mpo")

FORMAT = 1


class ReferenceTableError(ConfigError):
    """A reference table that is missing, stale or incomplete; the message names the fix."""


def reference_log_probs(chunks, batches, *, dtype):
    """Forward-only pass of ``chunks`` over the micro-batches: [pairs, 2] summed log-probs per
    micro-batch on the last pipeline stage, None elsewhere."""
    def forward_step(data_iterator, model):
        b = next(data_iterator)
        pixels = normalize_pixels(b["pixel_values"], dtype)
        out = model(b["input_ids"], b["position_ids"], pixel_values=pixels, packed_seq_params=packed_seq_params(b),
                    output_hidden=True, image_slots=b.get("image_slots"))

        def loss_func(hidden):
            language_model = get_attr_wrapped_model(model, "language_model")
            logp = token_log_probs(language_model, hidden, b["labels"], b["response_side"] >= 0)
            return hidden.new_zeros(()), {"ref": pair_sums(logp, b).detach()}

        return out, loss_func

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
            model=chunks, num_microbatches=len(batches), seq_length=int(batches[0]["input_ids"].shape[1]),
            micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [o["ref"] for o in outputs]


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory itself, or the newest good one of a save directory."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    found = ckpt.CheckpointManager(path).latest_valid() if path.is_dir() else None
    if found is None:
        raise ckpt.CheckpointError(f"{path}: no usable checkpoint for the MPO reference (set mpo.reference_checkpoint "
                                   f"or checkpoint.load to an SFT checkpoint)")
    return found


def reference_checkpoint(config) -> Path:
    return resolve_checkpoint(config.mpo.reference_checkpoint or config.checkpoint.load)


class ModelReference:
    """The frozen starting policy, same layout as the trained one."""

    def __init__(self, config, variable_seq_lengths: bool):
        self.dtype = {"fp32": torch.float32}.get(config.training.precision, torch.bfloat16)
        self.chunks = build_model_chunks(config, initialize=False)
        source = reference_checkpoint(config)
        ckpt.load_model_checkpoint(self.chunks, source)
        for chunk in self.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
            chunk.config.variable_seq_lengths = variable_seq_lengths
        logger.info("MPO reference model loaded from %s", source)

    def log_probs(self, batches):
        return reference_log_probs(self.chunks, batches, dtype=self.dtype)


# ------------------------------------------------------------------ the precomputed table


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config, specs) -> dict:
    """What the reference log-probs depend on, by part (data, checkpoint, template)."""
    d = config.data
    ckpt_dir = reference_checkpoint(config)
    files = sorted((p.name, p.stat().st_size) for p in ckpt_dir.iterdir() if p.is_file())
    return {
        "data": {s.name: {"annotation_sha256": _sha256(s.annotation), "root": str(s.root),
                          "max_dynamic_patch": s.max_dynamic_patch or d.max_dynamic_patch,
                          "min_dynamic_patch": s.min_dynamic_patch, "data_augment": s.data_augment}
                 for s in specs},
        "checkpoint": {"path": str(ckpt_dir.resolve()), "files": [list(f) for f in files],
                       "metadata_sha256": _sha256(ckpt_dir / "metadata.json")},
        "template": {"template": d.template, "system_message": d.system_message,
                     "tokenizer_sha256": _sha256(d.tokenizer_path) if os.path.isfile(d.tokenizer_path) else
                     d.tokenizer_path, "image_size": d.image_size, "num_image_token": d.num_image_token,
                     "use_thumbnail": d.use_thumbnail, "v2pe": d.v2pe, "v2pe_delta": d.v2pe_delta,
                     "max_tokens": d.max_tokens, "max_tiles": d.max_tiles},
    }


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    for part in ("data", "checkpoint", "template"):
        a, b = saved.get(part, {}), now.get(part, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{part}: {key} was {a.get(key)!r}, now {b.get(key)!r}")
    return out


def _check_augment(specs) -> None:
    augmented = [s.name for s in specs if s.data_augment]
    if augmented:
        raise ConfigError(f"mpo.reference=precomputed needs the same pixels in every epoch, but datasets "
                          f"{augmented} have data_augment=true: set it to false in the meta file, or use "
                          f"mpo.reference=model")


class TableReference:
    """Reference log-probs read from ``mpo.reference_file`` (checked against the run's data,
    checkpoint and template)."""

    def __init__(self, config, specs):
        path = Path(config.mpo.reference_file)
        if not path.is_file():
            raise ReferenceTableError(f"mpo.reference_file={path} does not exist: run `megatron-internvl mpo-reference "
                                 f"RECIPE.yaml` first (same recipe and overrides as training)")
        _check_augment(specs)
        table = torch.load(path, weights_only=True)
        if table.get("format") != FORMAT:
            raise ReferenceTableError(f"{path}: reference table format {table.get('format')} != {FORMAT}: recompute it")
        diff = _differences(json.loads(table["fingerprint"]), fingerprint(config, specs))
        if diff:
            raise ReferenceTableError(f"{path} is stale, it was computed for other inputs: " + "; ".join(diff)
                                 + ". Rerun `megatron-internvl mpo-reference` for this recipe")
        self.path = path
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.index = {pid: k for k, pid in enumerate(table["ids"])}
        self.values = table["log_probs"]

    def log_probs(self, batches):
        if not self.last_stage:
            return None
        out = []
        for b in batches:
            try:
                rows = [self.index[pid] for pid in b["pair_ids"]]
            except KeyError as exc:
                raise ReferenceTableError(f"pair {exc.args[0]} is not in {self.path}: rerun mpo-reference") from None
            out.append(self.values[rows].to(b["input_ids"].device))
        return out


def build_reference(config, specs, variable_seq_lengths: bool):
    if config.mpo.reference == "precomputed":
        return TableReference(config, specs)
    return ModelReference(config, variable_seq_lengths)


# ------------------------------------------------------------------ mpo-reference command

CHUNK_PAIRS = 256


def _chunk_packs(builder, cfg, tokenizer, pairs, stats):
    """The packed micro-batches of one chunk's pairs [(ds, line, global index)]."""
    packer = TwoBudgetPacker(cfg.max_tokens, cfg.max_tiles, cfg.pack_buffer_size)
    built, groups = {}, []
    for ds, line, i in pairs:
        res = builder.build(ds, line, i, i)
        stats["seen"] += 1
        if isinstance(res, Skip):
            stats["skipped"][res.reason] = stats["skipped"].get(res.reason, 0) + 1
            logger.warning("%s", res)
            continue
        for s in res:
            built[s.key] = s
            keys = packer.add(s.key, s.num_tokens, s.tiles)
            if keys is not None:
                groups.append(keys)
    groups += packer.flush()
    for keys in groups:
        pairs_ = [built[k] for k in keys]
        batch = collate_pack(pairs_, image_size=cfg.image_size, pad_to_multiple=cfg.pad_to_multiple,
                             pad_id=tokenizer.pad_id)
        yield finish_pair_batch(batch, pairs_, cfg.num_image_token)


class _ChunkReader:
    """The packs of the chunks one data-parallel replica computes (for BroadcastLoader)."""

    dataset_names = []

    def __init__(self, builder, cfg, tokenizer, work):
        self.stats = {"seen": 0, "skipped": {}}
        self._it = self._packs(builder, cfg, tokenizer, work)

    def _packs(self, builder, cfg, tokenizer, work):
        for c, pairs in work:
            for batch in _chunk_packs(builder, cfg, tokenizer, pairs, self.stats):
                batch["chunk"] = c
                yield batch
            yield {"chunk": c, "end_of_chunk": True, "pixel_values": torch.zeros(0, 3, 0, 0)}

    def __next__(self):
        return next(self._it)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def precompute(config) -> Path:
    """Run the reference over every preference pair once; write mpo.reference_file."""
    launch = distributed.initialize(config.parallel, seed=config.training.seed)
    config.validate(world_size=launch.world_size)
    if not config.mpo.reference_file:
        raise ReferenceTableError("set mpo.reference_file: where to write the reference log-probs")
    out = Path(config.mpo.reference_file)
    tokenizer = build_tokenizer(config.data)
    check_data_matches_model(config, tokenizer)
    config.data.pad_to_multiple = pack_pad_multiple(config)
    specs, files = open_preference_sources(config.data)
    _check_augment(specs)
    stamp = json.dumps(fingerprint(config, specs), sort_keys=True)
    parts = out.with_name(out.name + ".parts")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    done = [None]
    if launch.rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        stamp_file = parts / "fingerprint.json"
        if stamp_file.is_file() and stamp_file.read_text() != stamp:
            logger.warning("%s holds chunks of other inputs; starting over", parts)
            for p in parts.iterdir():
                p.unlink()
        stamp_file.write_text(stamp)
        done[0] = sorted(p.name for p in parts.glob("chunk*.pt"))
    torch.distributed.broadcast_object_list(done, src=0)
    done = set(done[0])

    all_pairs = [(ds, line) for ds, f in enumerate(files) for line in range(len(f))]
    chunks_total = -(-len(all_pairs) // CHUNK_PAIRS)
    name = lambda c, r: f"chunk{c:06d}-dp{r}.pt"  # noqa: E731
    work = []
    for c in range(chunks_total):
        if name(c, dp_rank) in done:
            continue
        pairs = [(ds, line, i) for i, (ds, line) in enumerate(all_pairs[c * CHUNK_PAIRS:(c + 1) * CHUNK_PAIRS],
                                                               start=c * CHUNK_PAIRS) if i % dp == dp_rank]
        work.append((c, pairs))
    if done:
        logger.info("mpo-reference: %d chunk files already written, continuing", len(done))

    media = MediaLoader(config.data.image_size, config.data.use_thumbnail, config.data.image_backend)
    builder = PairBuilder(config.data, tokenizer, specs, files, media, config.mpo.sft_reduction)
    reader = BroadcastLoader(lambda: _ChunkReader(builder, config.data, tokenizer, work))
    p = config.parallel
    model = ModelReference(config, variable_seq_lengths=p.pipeline_parallel > 1
                           and (p.virtual_pipeline_parallel or 1) == 1)
    writer = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    device = distributed.compute_device()
    ids, values = [], []
    for _ in range(len(work)):
        while True:
            batch = next(reader)
            if batch.get("end_of_chunk"):
                break
            refs = model.log_probs([to_device(batch, device)])
            if writer:
                ids += batch["pair_ids"]
                values.append(refs[0].float().cpu())
        if writer:
            _atomic_save({"ids": ids, "log_probs": torch.cat(values) if values else torch.zeros(0, 2)},
                         parts / name(batch["chunk"], dp_rank))
        ids, values = [], []
    torch.distributed.barrier()
    if launch.rank == 0:
        all_ids, all_values = [], []
        for c in range(chunks_total):
            for r in range(dp):
                part = torch.load(parts / name(c, r), weights_only=True)
                all_ids += part["ids"]
                all_values.append(part["log_probs"])
        _atomic_save({"format": FORMAT, "fingerprint": stamp, "ids": all_ids,
                      "log_probs": torch.cat(all_values) if all_values else torch.zeros(0, 2)}, out)
        for f in parts.iterdir():
            f.unlink()
        parts.rmdir()
        logger.info("mpo-reference: %d pairs written to %s", len(all_ids), out)
    if reader.is_source and reader.inner.stats["seen"]:
        st = reader.inner.stats
        logger.info("mpo-reference: %d pairs read on this replica, skipped by reason: %s", st["seen"], st["skipped"])
    torch.distributed.barrier()
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: megatron-internvl mpo-reference RECIPE.yaml [section.key=value ...]")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    def run(args):
        precompute(load_config(args[0], args[1:]))
        return 0

    return run_reporting("megatron-internvl mpo-reference", run, argv)


if __name__ == "__main__":
    sys.exit(main())
