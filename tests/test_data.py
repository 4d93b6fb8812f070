"""Calibration data: sources, packing, seeds, errors and the on-disk cache (tiny word-level tokenizer)."""

import json
import os

import pytest
import torch

import dms_llm.data.calibration as calibration
import dms_llm.data.sources as sources
from dms_llm.data import describe_dataset, load_calibration, pack_blocks, tokenize_units

WORDS = [f"w{i}" for i in range(200)]


def word_tokenizer(bos=True, words=WORDS):
    """A word-level tokenizer over w0..w199. Its post-processor adds <s> when special tokens are on, so
    a test sees any BOS that packing lets through."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="<eos>")


EOS = 2


def wid(word):
    return 3 + int(word[1:])


def doc(start, n):
    return " ".join(WORDS[(start + k) % 200] for k in range(n))


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "meta": {"x": 1}}) + "\n")
    return str(path)


@pytest.fixture
def tok():
    return word_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    """40 documents of 9 words each: 40*9 + 39 EOS = 399 tokens."""
    return write_jsonl(tmp_path / "train.jsonl", [doc(5 * i, 9) for i in range(40)])


def test_tokenize_units_puts_one_eos_between_documents_and_no_bos(tok):
    stream = tokenize_units(tok, [("w1 w2", True), ("w3 w4 w5", True), ("w6", True)])
    assert stream.tolist() == [wid("w1"), wid("w2"), EOS, wid("w3"), wid("w4"), wid("w5"), EOS, wid("w6")]
    # pieces of one document (starts=False) are not separated; blank documents add no EOS
    stream = tokenize_units(tok, [("w1", True), ("w2", False), ("  ", True), ("", True), ("w3", True)])
    assert stream.tolist() == [wid("w1"), wid("w2"), EOS, wid("w3")]


def test_tokenize_units_without_eos_token_just_concatenates():
    tok = word_tokenizer()
    tok.eos_token = None
    assert tok.eos_token_id is None
    assert tokenize_units(tok, [("w1", True), ("w2", True)]).tolist() == [wid("w1"), wid("w2")]


def test_packing_shape_blocks_and_seed(tok, corpus, tmp_path):
    x = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=0, cache_dir=str(tmp_path / "c1"))
    assert x.shape == (8, 16) and x.dtype == torch.long
    assert (x != 1).all(), "no BOS may be added"

    # every row is one of the non-overlapping blocks of the packed stream, and rows are distinct blocks
    stream = tokenize_units(tok, sources._file_units(corpus, "text"))
    assert stream.numel() == 40 * 9 + 39
    blocks = pack_blocks(stream, 16)
    assert blocks.shape == (399 // 16, 16)
    index = {tuple(b.tolist()): i for i, b in enumerate(blocks)}
    picked = [index[tuple(r.tolist())] for r in x]
    assert len(set(picked)) == 8
    assert (x == EOS).any()

    # same seed, fresh cache: identical; other seeds: different choice of blocks
    y = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=0, cache_dir=str(tmp_path / "c2"))
    assert torch.equal(x, y)
    z = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=1, cache_dir=str(tmp_path / "c2"))
    assert not torch.equal(x, z)
    assert sorted(index[tuple(r.tolist())] for r in z) != sorted(picked)


def test_txt_is_one_document(tok, tmp_path):
    lines = [doc(3 * i, 4) for i in range(30)]
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(lines[:15]) + "\n\n \n" + "\n".join(lines[15:]) + "\n")
    x = load_calibration(str(path), tok, seq_len=10, num_samples=12, cache_dir=str(tmp_path / "c"))
    assert x.shape == (12, 10)
    assert not (x == EOS).any(), "a .txt file is one document: no EOS inside it"
    assert set(x.flatten().tolist()) <= {wid(w) for w in " ".join(lines).split()}


def test_txt_split_into_pieces_tokenises_like_whole_text(tok, tmp_path, monkeypatch):
    text = "\n".join(doc(i, 7) for i in range(300)) + "\n"
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(sources, "_TEXT_PIECE_CHARS", 100)
    assert len(list(sources._text_pieces(text))) > 10
    stream = tokenize_units(tok, sources._file_units(str(path), "text"))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert stream.tolist() == whole


def test_jsonl_custom_field_and_missing_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [doc(i, 6) for i in range(30)], field="content")
    x = load_calibration(path, tok, seq_len=8, num_samples=5, text_field="content", cache_dir=str(tmp_path / "c"))
    assert x.shape == (5, 8)
    with pytest.raises(KeyError, match="no field 'text'.*content"):
        load_calibration(path, tok, seq_len=8, num_samples=5, cache_dir=str(tmp_path / "c"))


def test_json_array_and_column_layouts(tok, tmp_path):
    docs = [doc(i, 6) for i in range(20)]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"body": d} for d in docs]))
    cols = tmp_path / "b.json"
    cols.write_text(json.dumps({"body": docs}))
    a = load_calibration(str(arr), tok, seq_len=8, num_samples=4, text_field="body", cache_dir=str(tmp_path / "c"))
    b = load_calibration(str(cols), tok, seq_len=8, num_samples=4, text_field="body", cache_dir=str(tmp_path / "c"))
    assert torch.equal(a, b)


def test_parquet_field(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [doc(2 * i, 8) for i in range(25)]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"sentence": docs, "id": list(range(25))}), path)
    x = load_calibration(str(path), tok, seq_len=8, num_samples=6, text_field="sentence", cache_dir=str(tmp_path / "c"))
    assert x.shape == (6, 8)
    # the same documents as JSON Lines give the same tensor: format does not change packing
    same = write_jsonl(tmp_path / "same.jsonl", docs, field="sentence")
    y = load_calibration(same, tok, seq_len=8, num_samples=6, text_field="sentence", cache_dir=str(tmp_path / "c"))
    assert torch.equal(x, y)
    with pytest.raises(KeyError, match="no column 'text'.*sentence"):
        load_calibration(str(path), tok, seq_len=8, num_samples=6, cache_dir=str(tmp_path / "c"))


def test_folder_reads_every_training_file_and_skips_eval_splits(tok, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("w1 w2 w3\nw4\n")
    write_jsonl(folder / "sub" / "b.jsonl", ["w5 w6", "w7"])
    (folder / "valid.txt").write_text("w150 w151 w152\n")  # must never be read
    (folder / "ignored.csv").write_text("w199\n")
    stream = tokenize_units(tok, sources._resolve_source(str(folder), None, "text").units())
    assert stream.tolist() == [wid("w1"), wid("w2"), wid("w3"), wid("w4"), EOS, wid("w5"), wid("w6"), EOS, wid("w7")]
    x = load_calibration(str(folder), tok, seq_len=3, num_samples=3, cache_dir=str(tmp_path / "c"))
    assert x.shape == (3, 3)
    info = describe_dataset(str(folder))
    assert [os.path.basename(f["path"]) for f in info["files"]] == ["a.txt", "b.jsonl"]
    assert len(info["sha256"]) == 64


def test_eval_split_files_are_refused(tok, tmp_path):
    for name in ["wiki.test.raw", "ptb.valid.txt", "dev.jsonl", "hellaswag_val.jsonl"]:
        path = tmp_path / name
        path.write_text("w1 w2 w3\n")
        with pytest.raises(ValueError, match="evaluation split"):
            load_calibration(str(path), tok, seq_len=2, num_samples=1, cache_dir=str(tmp_path / "c"))
    assert not sources.looks_like_eval_split("sample_c4-rp1.jsonl")
    assert not sources.looks_like_eval_split("wiki.train.tokens")


def test_too_little_text_says_how_many_blocks(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"24 block\(s\) of seq_len=16.*num_samples=30.*at most 24"):
        load_calibration(corpus, tok, seq_len=16, num_samples=30, cache_dir=str(tmp_path / "c"))
    assert load_calibration(corpus, tok, seq_len=16, num_samples=24, cache_dir=str(tmp_path / "c")).shape == (24, 16)


def test_empty_inputs_give_clear_errors(tok, tmp_path):
    empty = tmp_path / "train.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        load_calibration(str(empty), tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="holds no text"):
        load_calibration(blank, tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no usable file"):
        load_calibration(str(tmp_path / "nothing"), tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration(str(tmp_path / "missing.jsonl"), tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="unknown calibration dataset 'wikitext3'"):
        load_calibration("wikitext3", tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="positive"):
        load_calibration(str(empty), tok, seq_len=0, num_samples=1, cache_dir=str(tmp_path / "c"))


def test_cache_hit_and_misses(tok, corpus, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    x = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=3, cache_dir=cache)
    assert len([f for f in os.listdir(cache) if f.endswith(".pt")]) == 1

    calls = []
    real = calibration.tokenize_units

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(calibration, "tokenize_units", counting)
    assert torch.equal(load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=3, cache_dir=cache), x)
    assert calls == [], "the second identical call must come from the cache"

    for kwargs in [dict(seed=4), dict(seq_len=8), dict(num_samples=7)]:
        args = dict(seq_len=16, num_samples=8, seed=3) | kwargs
        load_calibration(corpus, tok, cache_dir=cache, **args)
    assert len(calls) == 3
    # same class, size and special tokens, different vocabulary: only the vocabulary hash tells them apart
    load_calibration(corpus, word_tokenizer(words=WORDS[::-1]), seq_len=16, num_samples=8, seed=3, cache_dir=cache)
    assert len(calls) == 4, "a different tokenizer must miss"

    # an edited file of the same size misses (mtime), and the new text is what comes back
    text = open(corpus).read()
    with open(corpus, "w") as f:
        f.write(text.replace("w10 w11", "w11 w10"))
    st = os.stat(corpus)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert os.path.getsize(corpus) == len(text)
    y = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=3, cache_dir=cache)
    assert len(calls) == 5

    write_jsonl(corpus, [doc(7 * i, 11) for i in range(40)])
    y = load_calibration(corpus, tok, seq_len=16, num_samples=8, seed=3, cache_dir=cache)
    assert len(calls) == 6 and not torch.equal(x, y)


def test_corrupt_cache_file_is_rebuilt(tok, corpus, tmp_path):
    cache = tmp_path / "cache"
    x = load_calibration(corpus, tok, seq_len=16, num_samples=4, cache_dir=str(cache))
    (f,) = [p for p in cache.iterdir() if p.suffix == ".pt"]
    f.write_bytes(b"not a torch file")
    assert torch.equal(load_calibration(corpus, tok, seq_len=16, num_samples=4, cache_dir=str(cache)), x)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DMS_LLM_CACHE", str(tmp_path / "root"))
    assert calibration.default_cache_dir() == str(tmp_path / "root" / "data")


def test_data_dir_resolution(monkeypatch, tmp_path, tok):
    from dms_llm.runs.options import data_dir_default
    from dms_llm.evaluation.tasks.utils import data_dir_path

    monkeypatch.delenv("DMS_DATA_DIR", raising=False)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sources.__file__))))
    # the repository's default is the commands' (the library takes a folder or $DMS_DATA_DIR)
    assert data_dir_default() == os.path.abspath(os.path.join(repo, "..", "shared", "data"))
    with pytest.raises(FileNotFoundError, match="DMS_DATA_DIR"):
        data_dir_path()
    monkeypatch.setenv("DMS_DATA_DIR", str(tmp_path))
    assert data_dir_path() == tmp_path
    assert data_dir_path(str(tmp_path / "x")) == tmp_path / "x"  # the argument first; existence is checked on use
    # an empty data dir: the default dataset says which file it needs and how to point at it
    with pytest.raises(FileNotFoundError, match=r"sample_c4-rp1\.jsonl.*data_dir"):
        load_calibration(None, tok, seq_len=4, num_samples=1, cache_dir=str(tmp_path / "c"))
    (tmp_path / "c4").mkdir()
    write_jsonl(tmp_path / "c4" / "sample_c4-rp1.jsonl", [doc(i, 5) for i in range(10)])
    assert load_calibration("c4-sample", tok, seq_len=4, num_samples=3, cache_dir=str(tmp_path / "c")).shape == (3, 4)


def test_both_c4_samples_give_twice_the_blocks(tok, tmp_path):
    """`c4-samples` reads both C4 train samples: the blocks of one and of the other, and says which file it lacks."""
    (tmp_path / "c4").mkdir()
    write_jsonl(tmp_path / "c4" / "sample_c4-rp1.jsonl", [doc(i, 6) for i in range(8)])
    with pytest.raises(FileNotFoundError, match=r"sample_c4-rp2\.jsonl"):
        load_calibration("c4-samples", tok, seq_len=4, num_samples=1, data_dir=str(tmp_path), cache_dir=str(tmp_path / "c"))
    write_jsonl(tmp_path / "c4" / "sample_c4-rp2.jsonl", [doc(100 + i, 6) for i in range(8)])
    one = pack_blocks(tokenize_units(tok, ((d, True) for d in [doc(i, 6) for i in range(8)])), 4)
    both = load_calibration("c4-samples", tok, seq_len=4, num_samples=2 * len(one) - 1, data_dir=str(tmp_path),
                            cache_dir=str(tmp_path / "c"))
    assert len(both) > len(one)  # more blocks than the first sample holds
    with pytest.raises(ValueError, match="at most"):
        load_calibration("c4-sample", tok, seq_len=4, num_samples=len(both), data_dir=str(tmp_path), cache_dir=str(tmp_path / "d"))
    (tmp_path / "c4" / "extra.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="other files"):
        load_calibration("c4-samples", tok, seq_len=4, num_samples=1, data_dir=str(tmp_path), cache_dir=str(tmp_path / "e"))


def test_offline_named_sources(tok, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # c4 falls back to the local train sample, and is then the same tensor as the default
    c4 = load_calibration("c4", tok, seq_len=64, num_samples=4, data_dir=shared_data, cache_dir=str(tmp_path / "a"))
    default = load_calibration(
        None, tok, seq_len=64, num_samples=4, data_dir=shared_data, cache_dir=str(tmp_path / "b")
    )
    assert torch.equal(c4, default)
    with pytest.raises(ConnectionError, match="tatsu-lab/alpaca"):
        load_calibration("alpaca", tok, seq_len=64, num_samples=4, data_dir=shared_data, cache_dir=str(tmp_path / "a"))

    info = describe_dataset(None, shared_data)
    assert info["source"].endswith(os.path.join("c4", "sample_c4-rp1.jsonl")) and info["split"] == "train"
    assert info["sha256"] == "60fcb37a00707c72426b8cd9cdd6e6b2c00f4db94ad1cdb1fe02c3f67cb26d91"
    wiki = describe_dataset("wikitext2", shared_data)
    assert wiki["source"].endswith("wiki.train.tokens") and "<unk>" in wiki["note"]
    ptb = describe_dataset("ptb", shared_data)
    assert ptb["source"].endswith("ptb.train.txt") and ptb["split"] == "train"


@pytest.mark.slow
def test_default_c4_sample_with_real_tokenizer(shared_data, tmp_path):
    from transformers import AutoTokenizer

    from dms_llm.checkpoints.embedded import embedded_default_dir

    tok = AutoTokenizer.from_pretrained(embedded_default_dir())
    x = load_calibration(None, tok, seq_len=512, num_samples=16, data_dir=shared_data, cache_dir=str(tmp_path))
    assert x.shape == (16, 512) and int(x.max()) < len(tok)
    assert (x == tok.eos_token_id).any(), "C4 documents are separated by EOS"
    assert not (x == tok.bos_token_id).any(), "no BOS (<|im_start|>) is added"
    text = tok.decode(x[0])
    assert len(text.split()) > 200, "real English text, not unknown-token noise"
