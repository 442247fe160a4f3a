"""From token examples to batches: packing, the held-out split, the seeded epoch order, padding.

Every function here is a pure function of its arguments (the order of micro-batch ``i`` depends only on
the seed and ``i``), so a resumed run needs only the number of micro-batches it has consumed.
"""

from __future__ import annotations

import torch

from peftkit.train.data import IGNORE, Example


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenate causal-LM examples and cut them into ``block``-token examples (last one may be shorter)."""
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [
        {"input_ids": ids[i : i + block], "labels": labels[i : i + block], "prompt_len": 0, "answers": []}
        for i in range(0, len(ids), block)
    ]


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (train, held-out) split holding out ``fraction`` of the examples."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(round(len(examples) * fraction))
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of ``epoch``: a permutation that depends only on ``seed`` and ``epoch``.

    Because the order is recomputed, a resumed run needs only the number of consumed micro-batches.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def length_grouped_order(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order with similar lengths batched together (less padding), still seeded.

    The random order is cut into windows of 50 batches, each window sorted by length, and the resulting
    batches shuffled — so batches are homogeneous in length but their sequence stays random.
    """
    order = epoch_order(len(examples), seed, epoch)
    window = batch_size * 50
    grouped: list[int] = []
    for start in range(0, len(order), window):
        grouped += sorted(order[start : start + window], key=lambda i: len(examples[i]["input_ids"]))
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped) - batch_size + 1, batch_size)]
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7)
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


#: (batch_size, seed, epoch, grouped) → (the examples list it was computed for, the order). Holding the list
#: keeps its id from being reused, and the identity check keeps another list from hitting the entry.
_ORDER_CACHE: dict[tuple[int, int, int, bool], tuple[list[Example], list[int]]] = {}


def micro_batch(
    examples: list[Example], batch_size: int, seed: int, index: int, group_by_length: bool = False
) -> list[Example]:
    """The ``index``-th micro-batch of the whole run (epochs follow each other; last partial batch dropped).

    A pure function of its arguments, so a resumed run needs only ``index``.
    """
    per_epoch = max(len(examples) // batch_size, 1)
    epoch, pos = divmod(index, per_epoch)
    key = (batch_size, seed, epoch, group_by_length)
    cached = _ORDER_CACHE.get(key)
    if cached is None or cached[0] is not examples:
        if group_by_length:
            order = length_grouped_order(examples, batch_size, seed, epoch)
        else:
            order = epoch_order(len(examples), seed, epoch)
        _ORDER_CACHE.clear()  # one run at a time: keep only the current epoch
        _ORDER_CACHE[key] = (examples, order)
    order = _ORDER_CACHE[key][1]
    return [examples[i] for i in order[pos * batch_size : (pos + 1) * batch_size]]


def collate(batch: list[Example], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        ids[i, : len(ex["input_ids"])] = torch.tensor(ex["input_ids"])
        mask[i, : len(ex["input_ids"])] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        out["labels"] = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
    else:
        lw = max(len(ex["labels"]) for ex in batch)
        labels = torch.full((len(batch), lw), IGNORE, dtype=torch.long)
        for i, ex in enumerate(batch):
            labels[i, : len(ex["labels"])] = torch.tensor(ex["labels"])
        out["labels"] = labels
    return out
