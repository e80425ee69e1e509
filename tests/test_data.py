"""Corpus loading and batch sampling: determinism, split by file, rank sharding."""
import numpy as np
import pytest
import torch

from moe_ep.data import END_OF_DOCUMENT, BatchSampler, load_corpus, stdlib_files

pytestmark = pytest.mark.timeout(120)

CAP = 1 << 20


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=CAP)


def test_default_corpus_is_deterministic_and_capped(corpus):
    again = load_corpus(max_bytes=CAP)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.fingerprint == again.fingerprint
    assert corpus.train.numel() == CAP and corpus.val.numel() == CAP // 20
    assert corpus.train.dtype == torch.uint8


def test_default_corpus_splits_stdlib_by_file(corpus):
    root, files = stdlib_files()
    names = [f.relative_to(root).as_posix() for f in files]
    assert all(name.endswith(".py") and "site-packages" not in name for name in names)
    assert names == sorted(names)
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus.val_files == names[19::20][:len(corpus.val_files)]
    assert corpus.train_files == [n for i, n in enumerate(names) if (i + 1) % 20][:len(corpus.train_files)]
    first = (root / corpus.train_files[0]).read_bytes()
    assert bytes(corpus.train[:len(first)].tolist()) == first
    assert corpus.train[len(first)].item() == END_OF_DOCUMENT


def test_user_folder_and_single_file(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"doc_{i:02d}.txt").write_text(f"document {i} " * 20)
    (docs / ".hidden").write_text("never read")
    folder = load_corpus(str(docs), val_every=10)
    assert folder.val_files == [f"doc_{i:02d}.txt" for i in (9, 19, 29, 39)]
    assert len(folder.train_files) == 36 and b"never read" not in bytes(folder.train.tolist())
    single = tmp_path / "one.txt"
    single.write_bytes(bytes(range(256)) * 40)
    split = load_corpus(str(single), val_every=10)
    assert split.train.numel() + split.val.numel() == 256 * 40
    assert split.val.numel() == 256 * 4
    with pytest.raises(FileNotFoundError):
        load_corpus(str(tmp_path / "missing"))


def test_batches_are_deterministic_windows(corpus):
    sampler = BatchSampler(corpus, batch_size=4, seq_len=32, seed=7)
    batch = sampler.batch(5)
    assert batch.shape == (4, 33) and batch.dtype == torch.long
    assert torch.equal(batch, BatchSampler(corpus, 4, 32, seed=7).batch(5))
    assert not torch.equal(batch, sampler.batch(6))
    assert not torch.equal(batch, BatchSampler(corpus, 4, 32, seed=8).batch(5))
    for row, start in zip(batch, sampler.global_starts(5)):
        assert torch.equal(row, corpus.train[start:start + 33].long())


def test_ranks_get_disjoint_slices_of_one_global_batch(corpus):
    world, B = 4, 3
    ranks = [BatchSampler(corpus, B, 16, seed=0, rank=r, world_size=world) for r in range(world)]
    single = BatchSampler(corpus, B * world, 16, seed=0)
    for step in (0, 1, 17):
        per_rank = [s.batch(step) for s in ranks]
        assert torch.equal(torch.cat(per_rank), single.batch(step))
        starts = ranks[0].global_starts(step)
        slices = [set(starts[r * B:(r + 1) * B].tolist()) for r in range(world)]
        assert all(not slices[a] & slices[b] for a in range(world) for b in range(a + 1, world))


def test_validation_batches_are_fixed_and_sharded(corpus):
    ranks = [BatchSampler(corpus, 2, 16, seed=s, rank=r, world_size=2) for r, s in ((0, 0), (1, 5))]
    val0, val1 = ranks[0].val_batches(3), ranks[1].val_batches(3)
    assert len(val0) == 3 and val0[0].shape == (2, 17)
    single = BatchSampler(corpus, 4, 16, seed=9).val_batches(3)
    for i in range(3):
        assert torch.equal(torch.cat([val0[i], val1[i]]), single[i])


def test_resume_position_is_checked(corpus):
    sampler = BatchSampler(corpus, 2, 16, seed=0)
    assert sampler.check_resume(sampler.state_dict(42)) == 42
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(corpus, 2, 16, seed=1).check_resume(sampler.state_dict(42))
    # the position is layout-free: any split of the same global batch resumes it, another global batch does not
    assert BatchSampler(corpus, 1, 16, seed=0, rank=1, world_size=2).check_resume(sampler.state_dict(42)) == 42
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchSampler(corpus, 2, 16, seed=0, rank=1, world_size=2).check_resume(sampler.state_dict(42))


def test_too_short_split_raises(tmp_path):
    tiny = tmp_path / "t.txt"
    tiny.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(load_corpus(str(tiny)), 1, 64, seed=0)
