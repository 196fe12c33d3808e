"""commrt.data: default stdlib corpus, text and .bin sources, shards, batch sampler."""
import numpy as np
import pytest
import torch

from commrt.data import BatchSampler, Dataset, check_fits, load_dataset, stdlib_source_files


def test_data_stdlib_corpus_deterministic_split():
    files = stdlib_source_files()
    assert len(files) > 50 and files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts for p in files)
    a = load_dataset(None, corpus_bytes=300_000)
    b = load_dataset(None, corpus_bytes=300_000)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.vocab_size == 256 and a.train.dtype == np.uint8
    # the bound holds (plus one separator byte per file) and ~1/10 of it is validation
    total = len(a.train) + len(a.val)
    assert 300_000 <= total <= 300_000 + len(files)
    assert 0.03 < len(a.val) / total < 0.3
    # validation is every 10th file: the corpus is the files' bytes, nothing else
    tenth, first = files[9].read_bytes(), files[0].read_bytes()
    assert bytes(a.val[:len(tenth)]) == tenth
    assert bytes(a.train[:len(first)]) == first


def test_data_text_and_bin_files(tmp_path):
    text = tmp_path / "input.txt"
    text.write_bytes(bytes(range(256)) * 40)
    ds = load_dataset(str(text))
    assert ds.vocab_size == 256
    assert len(ds.train) + len(ds.val) == 256 * 40
    assert bytes(ds.val) == (bytes(range(256)) * 40)[len(ds.train):]

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=5000).astype(np.uint16)
    tokens[123] = 4321
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    ds = load_dataset(str(path))
    assert ds.vocab_size == 4322                     # largest id + 1
    assert np.array_equal(np.concatenate([ds.train, ds.val]), tokens)
    assert load_dataset(str(path), vocab_size=5000).vocab_size == 5000
    with pytest.raises(ValueError, match="smaller than"):
        load_dataset(str(path), vocab_size=100)

    folder = tmp_path / "split"
    folder.mkdir()
    tokens[:4000].tofile(folder / "train.bin")
    tokens[4000:].tofile(folder / "val.bin")
    ds = load_dataset(str(folder))
    assert np.array_equal(ds.train, tokens[:4000]) and np.array_equal(ds.val, tokens[4000:])


def test_data_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_dataset(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty or too short"):
        load_dataset(str(empty))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abcde")
    with pytest.raises(ValueError, match="whole number"):
        load_dataset(str(odd))
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 1000)
    ds = load_dataset(str(small))                      # 900 train, 100 validation tokens
    check_fits(ds, 1, 64)
    with pytest.raises(ValueError, match="900 tokens, 56 per rank at 16 ranks"):
        check_fits(ds, 16, 64)
    with pytest.raises(ValueError, match="validation split has 100 tokens"):
        check_fits(ds, 1, 128)


def test_data_shards_partition_train_split():
    train = np.arange(1003, dtype=np.uint16)
    ds = Dataset(train=train, val=train[:100], vocab_size=1003, source="test")
    for world in (1, 3, 4, 7):
        shards = [ds.shard(r, world) for r in range(world)]
        assert np.array_equal(np.concatenate(shards), train)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_data_batch_sampler_windows_and_resume():
    tokens = np.arange(500, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=6, block_size=16, seed=3, stream=1)
    x, y = sampler()
    assert x.shape == y.shape == (6, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)                       # targets are inputs shifted by one
    assert int(x.min()) >= 0 and int(y.max()) < 500
    batches = [sampler() for _ in range(5)]
    # resume from the saved position gives the same stream
    again = BatchSampler(tokens, 6, 16, seed=3, stream=1)
    again.load_state_dict({"position": 1, "seed": 3, "stream": 1})
    for expected in batches:
        got = again()
        assert torch.equal(got[0], expected[0])
    # other streams (ranks) and seeds draw other windows
    other = BatchSampler(tokens, 6, 16, seed=3, stream=2)
    assert not torch.equal(other.batch(0)[0], x)
    with pytest.raises(ValueError, match="another seed"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(tokens[:10], 2, 16, seed=0)
