"""Notes: reading the CSV (and its errors), routing to windows, and what the model does with them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stllm.data.city import DataError
from stllm.data.notes import coverage, read_notes, shuffled, with_notes
from stllm.data.prepared import PreparedCity

HEADER = "start,end,zones,kind,text\n"


def write(tmp_path, body: str, header: str = HEADER):
    path = tmp_path / "notes.csv"
    path.write_text(header + body)
    return path


def test_read_notes_names_ids_all_and_outside_range(tmp_path, tiny_city):
    names = tiny_city.nodes["name"].tolist()
    path = write(tmp_path, f'2024-01-02 10:00,2024-01-02 14:00,{names[1]};S03,fair,"A street fair"\n'
                           f'2024-01-03 00:00,2024-01-03 05:00,all,storm,"Snow, heavy"\n'
                           f'2030-01-01 00:00,2030-01-02 00:00,S00,parade,"Far in the future"\n')
    notes = read_notes(path, tiny_city)
    assert notes["nodes"].tolist() == [(1, 3), (), (0,)]
    assert notes["text"].tolist() == ["A street fair", "Snow, heavy", "Far in the future"]
    assert notes["start"][0] == pd.Timestamp("2024-01-02 10:00")
    texts, kinds, cover = coverage(notes, tiny_city.timestamps, tiny_city.n_nodes)
    assert texts == ["fair: A street fair", "storm: Snow, heavy"]          # the 2030 note meets no step: ignored
    assert kinds == ["fair", "storm"]
    t0 = tiny_city.time_index("2024-01-02 10:00")
    assert cover[:, :, 0].sum() == 5 * 2                                     # 10:00..14:00 inclusive, two nodes
    assert cover[t0:t0 + 5, [1, 3], 0].all() and not cover[t0 - 1, :, 0].any() and not cover[t0 + 5, :, 0].any()
    assert cover[:, :, 1].sum() == 6 * tiny_city.n_nodes                     # "all": every node


@pytest.mark.parametrize("row, message", [
    ("2024-01-02 10:00,2024-01-02 14:00,S00 Riversid,fair,x", r"row 2: field 'zones' names 'S00 Riversid'.*closest known: \['S00 Riverside'"),
    ("2024-01-02 10:00,2024-01-01 14:00,all,fair,x", r"row 2: end 2024-01-01 14:00:00 is before start"),
    ("yesterday,2024-01-01 14:00,all,fair,x", r"row 2: field 'start' is 'yesterday', not a time"),
    ("2024-01-02 10:00,2024-01-02 11:00,,fair,x", r"row 2: field 'zones' is empty"),
    ("2024-01-02 10:00,2024-01-02 11:00,all,fair,", r"row 2: field 'text' is empty"),
])
def test_bad_notes_name_file_row_and_field(tmp_path, tiny_city, row, message):
    path = write(tmp_path, "2024-01-01 00:00,2024-01-01 01:00,all,ok,fine\n" + row.replace("row 2", "") + "\n")
    with pytest.raises(DataError, match=str(path).replace(".", r"\.") + ", " + message.replace("row 2", "row 3")):
        read_notes(path, tiny_city)


def test_missing_column_and_missing_file(tmp_path, tiny_city):
    path = write(tmp_path, "2024-01-01 00:00,2024-01-01 01:00,all,x\n", header="start,end,zones,text\n")
    with pytest.raises(DataError, match=r"notes\.csv: notes need the columns .*missing \['kind'\]"):
        read_notes(path, tiny_city)
    with pytest.raises(DataError, match="notes file not found"):
        read_notes(tmp_path / "nope.csv", tiny_city)


def test_select_nodes_moves_note_positions(tiny_city):
    city = with_notes(tiny_city, [{"start": "2024-01-02", "end": "2024-01-03", "zones": "S01;S04", "kind": "k", "text": "a"},
                                  {"start": "2024-01-02", "end": "2024-01-03", "zones": "S02", "kind": "k", "text": "b"},
                                  {"start": "2024-01-02", "end": "2024-01-03", "zones": "all", "kind": "k", "text": "c"}])
    sub = city.select_nodes([4, 0, 1])
    assert sub.notes["nodes"].tolist() == [(0, 2), ()]                       # S04 -> 0, S01 -> 2; "b" is gone
    assert sub.notes["text"].tolist() == ["a", "c"]


def test_batch_carries_only_the_notes_its_windows_meet(tiny_city, tiny_config):
    cfg = tiny_config()
    city = with_notes(tiny_city, [{"start": "2024-01-05 10:00", "end": "2024-01-05 12:00", "zones": "S02",
                                   "kind": "fair", "text": "A street fair"}])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    t0 = city.time_index("2024-01-05 10:00")
    batch = prep.batch(np.array([t0 - 3, t0 + 40]))    # the first window's horizon meets the note, the second not
    assert batch["note_texts"] == ["fair: A street fair"]
    cover = batch["note_cover"]                                              # [b, t_in + t_out, N, J]
    assert cover.shape == (2, 24, 6, 1)
    assert cover[0, 12 + 3:12 + 6, 2, 0].eq(1).all() and cover[0].sum() == 3   # steps t0..t0+2 at S02 only
    assert cover[1].sum() == 0
    assert prep.batch(np.array([t0 + 40]))["note_texts"] == []


def test_shuffled_notes_keep_texts_and_move_places_and_times(tiny_city):
    city = with_notes(tiny_city, [{"start": "2024-01-05 10:00", "end": "2024-01-05 12:00", "zones": "S02;S03",
                                   "kind": "fair", "text": "A street fair"}])
    moved = shuffled(city.notes, city, seed=1)
    assert moved["text"].tolist() == ["A street fair"] and len(moved["nodes"][0]) == 2
    assert abs(moved["start"][0] - city.notes["start"][0]) >= pd.Timedelta("7D")
    assert moved["end"][0] - moved["start"][0] == pd.Timedelta("2h")


def _notes_city(tiny_city):
    return with_notes(tiny_city, [{"start": "2024-01-05 10:00", "end": "2024-01-05 15:00", "zones": "S02",
                                   "kind": "fair", "text": "A street fair draws crowds"}])


@pytest.mark.parametrize("notes, use_llm", [("text", True), ("flags", False), ("flags", True)])
def test_a_note_moves_the_forecast_only_where_and_when_it_holds(tiny_city, tiny_config, notes, use_llm):
    from stllm.train import build_model
    city = _notes_city(tiny_city)
    cfg = tiny_config([f"model.notes={notes}", f"model.use_llm={str(use_llm).lower()}"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    torch.nn.init.normal_(model.notes.mlp[-1].weight, std=0.5)              # an effect as training would give
    t0 = city.time_index("2024-01-05 10:00")
    batch = prep.batch(np.array([t0 - 3]))
    with torch.no_grad():
        with_note = model(batch)
        without = model({**batch, "note_texts": [], "note_kinds": [], "note_cover": batch["note_cover"][..., :0]})
    moved = (with_note - without).abs() > 1e-7                               # [1, t_out, N, C]
    assert moved[0, 3:9, 2].all()                                            # S02, the note's hours (t0..t0+5)
    moved[0, 3:9, 2] = False
    assert not moved.any()                                                   # nothing else
    assert model.notes is not None


def test_a_model_that_reads_only_notes_is_its_encoder_outside_them(tiny_city, tiny_config):
    """model.lm_layout=false: the language model reads the notes and nothing else; wherever no note holds, the
    forecast is exactly the encoder's read-out (the ablation of the same weights)."""
    from stllm.config import ConfigError
    from stllm.train import build_model
    city = _notes_city(tiny_city)
    cfg = tiny_config(["model.lm_layout=false"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    torch.nn.init.normal_(model.notes.mlp[-1].weight, std=0.5)
    torch.nn.init.normal_(model.skip.lin.weight, std=0.1)                    # a read-out as training would give
    t0 = city.time_index("2024-01-05 10:00")
    batch = prep.batch(np.array([t0 - 3, t0 - 40]))                          # meets the note | meets none
    with torch.no_grad():
        y = model(batch)
        model.llm_active = False
        encoder = model(batch)
    moved = (y - encoder).abs() > 1e-7
    assert moved[0, 3:9, 2].all() and moved.sum() == 6                        # only S02 in the note's hours
    assert torch.equal(y[1], encoder[1])
    for bad, message in ((["model.notes=flags"], "only the notes to read"), (["model.node_text=true"], "city layout"),
                         (["model.encoder_skip=false"], "encoder_skip=true")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(["model.lm_layout=false", *bad])


def test_lm_where_notes_corrects_only_the_nodes_whose_window_meets_a_note(tiny_city, tiny_config):
    """model.lm_where=notes: the language model's correction of the city layout reaches only the nodes whose window
    meets a note (S02 here); every other node, and a window with no note at all, is the encoder's read-out exactly.
    With the default (everywhere) it reaches every node."""
    from stllm.config import ConfigError
    from stllm.train import build_model
    city = _notes_city(tiny_city)
    t0 = city.time_index("2024-01-05 10:00")
    moved_nodes = {}
    for where in ("notes", "everywhere"):
        cfg = tiny_config([f"model.lm_where={where}"])
        prep = PreparedCity(city, cfg.data, cfg.encoder)
        torch.manual_seed(0)
        model = build_model(cfg, prep).eval()
        for p in [*model.head.parameters(), *model.skip.parameters()]:        # a correction as training would give
            torch.nn.init.normal_(p, std=0.1)
        batch = prep.batch(np.array([t0 - 3, t0 - 40]))                      # meets the note | meets none
        with torch.no_grad():
            y = model(batch)
            model.llm_active = False
            encoder = model(batch)
        moved = ((y - encoder).abs() > 1e-7).any(1)[..., 0]                   # [b, N]
        moved_nodes[where] = moved
    assert moved_nodes["notes"][0].nonzero().flatten().tolist() == [2]       # S02 only
    assert not moved_nodes["notes"][1].any()                                  # no note: the encoder, exactly
    assert moved_nodes["everywhere"].all()
    for bad in (["model.notes=none"], ["model.encoder_skip=false"]):
        with pytest.raises(ConfigError, match="lm_where=notes"):
            tiny_config(["model.lm_where=notes", *bad])
    with pytest.raises(ConfigError, match="lm_where"):
        tiny_config(["model.lm_where=somewhere"])


def test_untrained_note_effect_is_zero_and_text_cache_is_exact(tiny_city, tiny_config):
    from stllm.train import build_model
    city = _notes_city(tiny_city)
    cfg = tiny_config(["model.notes=text"])
    prep = PreparedCity(city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    t0 = city.time_index("2024-01-05 10:00")
    batch = prep.batch(np.array([t0 - 3, t0]))
    with torch.no_grad():
        a = model(batch)
        b = model({**batch, "note_texts": [], "note_kinds": [], "note_cover": batch["note_cover"][..., :0]})
    assert torch.equal(a, b)                                                 # zero-initialised: starts as no note
    torch.nn.init.normal_(model.notes.mlp[-1].weight, std=0.5)
    with torch.no_grad():
        cached = model(batch)
        assert model.reader.cache                                            # the note's state is cached
        model.reader.cache.clear()
        fresh = model(batch)
    assert torch.equal(cached, fresh)                                        # the cache gives what reading again gives


def test_text_reader_ignores_lora(tiny_city, tiny_config):
    """Note states come from the frozen backbone with adapters off, so training LoRA never stales the cache."""
    from stllm.train import build_model
    cfg = tiny_config(["model.notes=text"])
    model = build_model(cfg, PreparedCity(tiny_city, cfg.data, cfg.encoder)).eval()
    before = model.reader._read("storm: heavy rain")
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert torch.equal(before, model.reader._read("storm: heavy rain"))


def test_notes_through_cli_config_and_errors(tmp_path, capsys):
    """`stllm train --notes` sets data.notes (kept in the run's config); evaluate/predict take --notes; a bad notes
    file stops the command with the file, row and field named, before any run folder is written."""
    import yaml
    from stllm.cli import main
    from stllm.data.synthetic import make_city
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    names = make_city(n_nodes=6, n_days=21, seed=0).nodes["name"].tolist()
    good = tmp_path / "good.csv"
    good.write_text(HEADER + f'2024-01-15 10:00,2024-01-15 16:00,{names[2]},fair,"A street fair"\n')
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + '2024-01-15 10:00,2024-01-15 16:00,Nowhere Street,fair,"A street fair"\n')
    config = str(root / "configs" / "tiny.yaml")
    assert main(["train", "--config", config, "--out", str(tmp_path / "bad_run"), "--notes", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv, row 2: field 'zones' names 'Nowhere Street'" in err
    assert not (tmp_path / "bad_run").exists()
    run = tmp_path / "run"
    assert main(["train", "--config", config, "--out", str(run), "--notes", str(good), "--quiet",
                 "--set", "train.max_steps=2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["notes"] == str(good)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--notes", str(bad)]) == 2
    assert "field 'zones' names 'Nowhere Street'" in capsys.readouterr().err
    assert main(["predict", "--run", str(run), "--data", "synthetic", "--notes", str(good),
                 "--out", str(tmp_path / "f.npz")]) == 0


def test_node_text_reaches_each_node_once_and_the_cache_is_exact(tiny_city, tiny_config):
    """model.node_text: each node's name and description, read once by the language model, moves its own tokens;
    a renamed node changes its own forecast and (without cross-node attention) no other node's."""
    from dataclasses import replace
    from stllm.train import build_model
    cfg = tiny_config(["model.node_text=true"])
    prep = PreparedCity(tiny_city, cfg.data, cfg.encoder)
    model = build_model(cfg, prep).eval()
    torch.nn.init.normal_(model.node_proj.weight, std=0.5)
    torch.nn.init.normal_(model.head.w3.weight, std=0.5)                    # the language model's correction, as
    batch = prep.batch(prep.splits["test"][:2])                            # training would give it
    assert batch["node_texts"][0] == f"{tiny_city.nodes['name'][0]}: {tiny_city.nodes['description'][0]}"
    with torch.no_grad():
        a = model(batch)
        assert len(model.reader.cache) == tiny_city.n_nodes                  # read once per node
        model.reader.cache.clear()
        assert torch.equal(a, model(batch))                                  # cached = read again
        renamed = list(batch["node_texts"])
        renamed[3] = "Harbour Ferry Terminal: the busiest pier of the city"
        b = model({**batch, "node_texts": renamed})
    changed = (a - b).abs().amax(dim=(0, 1, 3)) > 1e-7                      # [N]
    assert changed.tolist() == [n == 3 for n in range(tiny_city.n_nodes)]


def test_training_only_the_note_effect_survives_batches_without_notes(tmp_path, tiny_city, tiny_config):
    """train.freeze=[encoder, head] with note flags leaves only the note effect trainable: a batch that meets no
    note has a loss without gradient, which must be a zero step, not a crash."""
    from stllm.train import train
    city = with_notes(tiny_city, [{"start": "2024-01-05 10:00", "end": "2024-01-05 15:00", "zones": "S02",
                                   "kind": "fair", "text": "A street fair"}])
    cfg = tiny_config(["model.use_llm=false", "model.notes=flags", "train.freeze=[encoder,head]",
                       "train.max_steps=4"])
    metrics = train(cfg, tmp_path / "run", city=city, progress=False)
    assert metrics["training"]["steps"] == 4


def test_runs_saved_before_notes_still_load(tmp_path, tiny_city, tiny_config):
    """A run whose config.yaml has no model.notes key (saved before notes existed) has no note effect's weights: it
    loads as model.notes=none instead of failing on missing weights."""
    import yaml
    from stllm.model import STLLM
    from stllm.train import train
    train(tiny_config(["model.notes=none", "train.max_steps=2"]), tmp_path / "old", city=tiny_city, progress=False)
    raw = yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())
    del raw["model"]["notes"], raw["model"]["note_hidden"], raw["model"]["node_text"]
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(raw))
    model = STLLM.from_pretrained(tmp_path / "old")
    assert model.cfg.model.notes == "none" and model.notes is None


def test_notes_max_hours_keeps_the_short_notes_only(tiny_city, tiny_config):
    from stllm.config import ConfigError
    from stllm.data.notes import with_notes
    city = with_notes(tiny_city, [
        {"start": "2024-01-05 10:00", "end": "2024-01-05 15:00", "zones": "S02", "kind": "fair", "text": "A fair"},
        {"start": "2024-01-03 00:00", "end": "2024-01-12 00:00", "zones": "all", "kind": "order", "text": "Stay home"}])
    kept = {h: PreparedCity(city, tiny_config([f"data.notes_max_hours={h}"]).data, tiny_config().encoder).note_kinds
            for h in (0, 48, 5, 4.9)}
    assert kept == {0: ["fair", "order"], 48: ["fair"], 5: ["fair"], 4.9: []}   # 5 h long: kept at 5, not 4.9
    with pytest.raises(ConfigError, match="notes_max_hours"):
        tiny_config(["data.notes_max_hours=-1"])
