"""Megatron indexed datasets in and GPTDataset splits out: the megatron.core side of the data.

The only data module that imports megatron.core (``megatron.core.datasets``; its prebuilt
``helpers_cpp`` is used as shipped, ``compile_helpers()`` is never called). Checked against
megatron-core 0.16.1.

- :class:`IndexedDatasetWriter` writes ``<prefix>.bin``/``.idx`` with
  ``IndexedDatasetBuilder`` under temporary names and renames them on :meth:`commit`, so a
  failed run leaves no partial dataset (used by ``cdp-preprocess``).
- :func:`build_gpt_datasets` gives the train/valid/test ``GPTDataset`` (or
  ``BlendedDataset``) splits from Megatron-LM's ``--data-path`` blend and ``--split``, through
  ``BlendedMegatronDatasetBuilder``: what a training loop consumes.

Every sample is a dict of ``tokens`` and ``labels`` (``seq_length`` ids each, drawn from
``seq_length + 1`` consecutive ids of the document stream), ``loss_mask``, ``position_ids``
and, when ``create_attention_mask``, a ``[1, s, s]`` bool ``attention_mask`` (True = masked).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from ..argtypes import is_number

__all__ = [
    "Blend",
    "IndexedDatasetWriter",
    "TrainValidTestDatasets",
    "build_gpt_datasets",
    "load_indexed_dataset",
    "parse_data_path",
    "train_valid_test_num_samples",
]

# ([prefix, ...], [weight, ...] or None): megatron's BlendedMegatronDatasetConfig.blend.
Blend = tuple[list[str], list[float] | None]


class IndexedDatasetWriter:
    """Write one Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``) atomically.

    Tokens go to ``<prefix>.bin.partial-<pid>``/``.idx.partial-<pid>``; :meth:`commit` renames
    them to the final names, :meth:`abort` (or leaving the ``with`` block without a commit)
    deletes them. The token dtype is Megatron's choice for the vocabulary (``uint16`` below
    65500 ids, else ``int32``), as Megatron-LM's ``tools/preprocess_data.py`` writes it.

    Each document is stored as one sequence, so GPTDataset's document and sequence counts agree.
    """

    def __init__(self, output_prefix: str | os.PathLike, vocab_size: int) -> None:
        self.prefix = str(output_prefix)
        self.bin_path, self.idx_path = get_bin_path(self.prefix), get_idx_path(self.prefix)
        suffix = f".partial-{os.getpid()}"
        self._tmp_bin, self._tmp_idx = self.bin_path + suffix, self.idx_path + suffix
        self.dtype = DType.optimal_dtype(vocab_size)
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, ids: Sequence[int]) -> None:
        """Append one document (its ids, end-of-document included if wanted)."""
        array = numpy.asarray(ids, dtype=self.dtype)
        self._builder.add_document(array, [array.size])
        self.documents += 1
        self.tokens += int(array.size)

    def commit(self) -> None:
        """Write the index and move both files to their final names."""
        self._builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._done = True

    def abort(self) -> None:
        """Delete the temporary files; the final names are never touched."""
        if self._done:
            return
        self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def load_indexed_dataset(prefix: str | os.PathLike) -> IndexedDataset:
    """Open ``<prefix>.bin``/``.idx`` (``dataset[i]`` is document i's ids as a numpy array)."""
    _check_prefix(str(prefix))
    return IndexedDataset(str(prefix))


# ---------------------------------------------------------------------------------------------
# --data-path and --split


def parse_data_path(data_path: str | Sequence[str]) -> Blend:
    """Parse Megatron-LM's ``--data-path``: ``"prefix"``, ``"prefix1 prefix2"`` (weights from
    the dataset sizes) or ``"w1 prefix1 w2 prefix2"`` (weights normalised by megatron).

    Accepts one string or the argparse list (``nargs='*'``). Every prefix must have its
    ``.bin`` and ``.idx``.

    Raises:
        ValueError: empty, a mix of weighted and unweighted entries, or a negative weight.
        FileNotFoundError: a prefix without its ``.bin``/``.idx`` files.
    """
    tokens = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path)
    tokens = [t for item in tokens for t in str(item).split()]
    if not tokens:
        raise ValueError("--data-path is empty")
    numeric = [is_number(t) for t in tokens]
    if len(tokens) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        weights = [float(w) for w in tokens[0::2]]
        prefixes = tokens[1::2]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
    elif any(numeric):
        raise ValueError(
            f"malformed --data-path {' '.join(tokens)!r}: give prefixes only, or weight/prefix "
            "pairs 'w1 prefix1 w2 prefix2'"
        )
    else:
        weights, prefixes = None, tokens
    for prefix in prefixes:
        _check_prefix(prefix)
    return prefixes, weights


def _check_prefix(prefix: str) -> None:
    missing = [p for p in (get_bin_path(prefix), get_idx_path(prefix)) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" (give the prefix without the extension: {prefix[:-4]})"
        raise FileNotFoundError(
            f"data prefix {prefix!r}: {', '.join(missing)} not found{hint}; "
            "build it with cdp-preprocess"
        )


# ---------------------------------------------------------------------------------------------
# GPTDataset splits


_SPLIT_NAMES = ("train", "valid", "test")


def _check_splits_have_tokens(config: GPTDatasetConfig, sizes: list) -> None:
    """Refuse a split that rounds to no documents of a prefix, where megatron cannot cope.

    ``--split`` can round a small share of a small dataset to zero documents. megatron-core
    then loops forever (``GPTDataset._get_num_epochs``) when that split is asked for samples,
    and a blend of several prefixes fails an assertion (a blend weight of 0). Only one
    unweighted prefix without a sample count gives a plain empty dataset.
    """
    prefixes, weights = config.blend
    single = len(prefixes) == 1 and weights is None
    for i, bounds in enumerate(config.split_matrix):
        if bounds is None or (single and sizes[i] is None):
            continue
        for prefix in prefixes:
            dataset = IndexedDataset(prefix)
            lengths = numpy.array(dataset.sequence_lengths)  # a copy: the index is unmapped with it
            del dataset
            begin, end = (int(round(b * float(len(lengths)))) for b in bounds)
            if int(lengths[begin:end].sum()) == 0:
                name = _SPLIT_NAMES[i]
                raise ValueError(
                    f"--split {config.split} leaves the {name} split of {prefix} no documents "
                    f"(documents {begin} to {end} of {len(lengths)}); use more documents or a "
                    f"larger {name} share (a share of 0 disables the split)"
                )


class TrainValidTestDatasets(NamedTuple):
    """The three splits (``None`` for a split of weight 0 in ``--split`` or without a
    per-split path; a split that rounds to no documents and was asked for no samples is an
    empty dataset)."""

    train: object
    valid: object
    test: object


def train_valid_test_num_samples(
    *,
    global_batch_size: int,
    eval_interval: int,
    eval_iters: int,
    train_iters: int | None = None,
    train_samples: int | None = None,
) -> tuple[int, int, int]:
    """Samples per split as Megatron-LM's training asks them of the dataset builder.

    ``train = train_samples or train_iters * global_batch_size``;
    ``valid = (train_iters // eval_interval + 1) * eval_iters * global_batch_size`` (one
    evaluation every ``eval_interval`` iterations plus one at the end);
    ``test = eval_iters * global_batch_size``.
    """
    if (train_iters is None) == (train_samples is None):
        raise ValueError("give exactly one of train_iters and train_samples")
    if train_samples is None:
        train_samples = train_iters * global_batch_size
    else:
        train_iters = train_samples // global_batch_size
    evaluations = train_iters // eval_interval + 1
    return (
        train_samples,
        evaluations * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


def build_gpt_datasets(
    tokenizer,
    *,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    data_path: str | Sequence[str] | None = None,
    split: str = "949,50,1",
    train_data_path: str | Sequence[str] | None = None,
    valid_data_path: str | Sequence[str] | None = None,
    test_data_path: str | Sequence[str] | None = None,
    data_cache_path: str | os.PathLike | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mmap_bin_files: bool = True,
    num_dataset_builder_threads: int = 1,
    multiple_validation_sets: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> TrainValidTestDatasets:
    """The train/valid/test datasets for a training loop, as Megatron-LM's pretrain_gpt builds them.

    Args:
        tokenizer: a tokenizer of :mod:`cdp_megatron.data.tokenizers` (``eod``, ``vocab_size``
            and ``unique_identifiers`` are read).
        seq_length: ``--seq-length``; every sample reads ``seq_length + 1`` ids.
        seed: ``--seed``; fixes the document and sample shuffles (same seed, same samples).
        num_samples: samples per split ``(train, valid, test)``; ``None`` takes one epoch of
            that split (only for unweighted blends; for one unweighted prefix 0 means the
            same). A dataset may hold more samples than asked (whole epochs). See
            :func:`train_valid_test_num_samples`.
        data_path: ``--data-path`` (see :func:`parse_data_path`), split by ``split``.
        split: ``--split``, e.g. ``"949,50,1"``: contiguous ranges of the documents of each
            prefix go to train, valid and test.
        train_data_path, valid_data_path, test_data_path: Megatron's per-split blends,
            instead of ``data_path``/``split``.
        data_cache_path: ``--data-cache-path`` for the shuffle indices; default megatron's
            ``<prefix>/cache/GPTDataset_indices``.
        reset_position_ids, reset_attention_mask, eod_mask_loss: Megatron's flags of the
            same names.
        create_attention_mask: build the causal ``attention_mask`` in the dataset
            (``--create-attention-mask-in-dataloader``, Megatron's default).
        num_dataset_builder_threads: ``--num-dataset-builder-threads``: threads that build the
            datasets of a blend's prefixes (the same datasets, sooner).
        multiple_validation_sets: ``--multiple-validation-sets``: with a ``valid_data_path`` of
            several unweighted prefixes, ``valid`` is a list of one dataset per prefix (each of
            the valid sample count), megatron-core's own.
        is_built_on_rank: called on each rank; ranks where it returns False get ``None``
            splits (Megatron-LM builds on TP rank 0 of the first and last pipeline stages).
            Default: every rank builds (rank 0 first when torch.distributed is initialised).

    Raises:
        ValueError / FileNotFoundError: malformed or missing data paths, a bad sample count.
    """
    per_split = (train_data_path, valid_data_path, test_data_path)
    if (data_path is None) == all(p is None for p in per_split):
        raise ValueError(
            "give --data-path, or --train-data-path/--valid-data-path/--test-data-path"
        )
    if len(num_samples) != 3 or any(n is not None and n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be (train, valid, test) counts >= 0, got {num_samples}")
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")

    if data_path is not None:
        blend, blend_per_split, split_arg = parse_data_path(data_path), None, split
    else:
        blend, split_arg = None, None
        blend_per_split = [None if p is None else parse_data_path(p) for p in per_split]
    for n, b in zip(num_samples, blend_per_split or [blend] * 3, strict=True):
        if n is None and b is not None and b[1] is not None:
            raise ValueError("a weighted --data-path blend needs a sample count for every split")
        if (
            b is not None
            and len(b[0]) > 1
            and data_cache_path is not None
            and not torch.distributed.is_initialized()
        ):
            # megatron-core (0.16.1 and later) BlendedDataset._build_indices calls
            # torch.distributed.get_rank() unguarded when a cache path is set.
            raise ValueError(
                "a blend of several datasets with data_cache_path needs torch.distributed "
                "initialised (megatron's BlendedDataset asks for the rank); initialise the "
                "process group first, or leave data_cache_path unset"
            )

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split_arg,
        path_to_cache=None if data_cache_path is None else str(Path(data_cache_path)),
        mmap_bin_files=mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=num_dataset_builder_threads,
        multiple_validation_sets=multiple_validation_sets,
        full_validation=multiple_validation_sets and num_samples[1] is None,
    )
    sizes = [None if n is None else int(n) for n in num_samples]
    if blend is not None and len(blend[0]) == 1 and blend[1] is None:
        # One unweighted prefix: 0 samples builds the same one-epoch dataset as None, but
        # megatron would loop forever on a split with no documents; None does not.
        sizes = [None if n == 0 else n for n in sizes]
    if blend is not None:
        _check_splits_have_tokens(config, sizes)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config
    )
    return TrainValidTestDatasets(*builder.build())
