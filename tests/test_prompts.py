import pytest
import torch

from stllm.backbone import build_tiny_tokenizer
from stllm.prompts import PromptError, PromptTemplate, city_layout

CITY_FIELDS = dict(n_nodes=3, city="Synthetic City", domain="synthetic mobility", channels="flow (count)",
                   interval="1 hour", t_in=12, t_out=12)

GOLDEN_CITY = (
    "Synthetic City, synthetic mobility: flow (count), one reading every 1 hour. Each sensor below has tokens for "
    "its last 12 readings and the same hours one day and one week earlier, then a slot for its next 12 readings.\n"
    "Sensors: <NODES><ST_HIS><ST_PRE></NODES>\n"
)


def test_city_template_renders_golden_string():
    assert PromptTemplate.load("city").render(**CITY_FIELDS) == GOLDEN_CITY


def test_missing_field_and_unknown_template():
    with pytest.raises(PromptError, match="missing field"):
        PromptTemplate.load("city").render(city="x")
    with pytest.raises(PromptError, match="not found"):
        PromptTemplate.load("no-such-template")


def test_city_layout_positions_and_mask():
    tok = build_tiny_tokenizer()
    text = "Head text. Sensors: <NODES><ST_HIS> then <ST_PRE>;</NODES>\n"
    layout = city_layout(text, tok, n_nodes=3, n_tokens=2)
    head = tok("Head text. Sensors: ")["input_ids"]
    between = tok(" then ", add_special_tokens=False)["input_ids"]
    semi = tok(";", add_special_tokens=False)["input_ids"]
    block = 2 + len(between) + 1 + len(semi)
    h = len(head)
    assert layout.his_pos.shape == (3, 2) and layout.pre_pos.shape == (3,)
    assert layout.his_pos[0, 0] == h and layout.pre_pos[0] == h + 2 + len(between)
    assert torch.equal(layout.his_pos[2] - layout.his_pos[1], torch.tensor([block, block]))
    assert len(layout.ids) == h + 3 * block
    # every node block sits at the same positions, right after the instruction
    assert torch.equal(layout.position_ids[layout.pre_pos], torch.full((3,), h + 2 + len(between)))
    # a node attends to the instruction and to its own block (causally), never to another node
    m = layout.mask
    p1 = layout.pre_pos[1]
    assert m[p1, :h].all() and m[p1, layout.his_pos[1]].all()
    assert not m[p1, layout.his_pos[0]].any() and not m[p1, layout.pre_pos[0]]
    assert not m[layout.his_pos[1, 0], p1]                               # causal inside the block
    assert torch.equal(m[:h, :h], torch.ones(h, h, dtype=torch.bool).tril())


def test_city_layout_cross_node_mask_sees_every_nodes_history():
    tok = build_tiny_tokenizer()
    text = "Head text. Sensors: <NODES><ST_HIS> then <ST_PRE>;</NODES>\n"
    own = city_layout(text, tok, n_nodes=3, n_tokens=2)
    cross = city_layout(text, tok, n_nodes=3, n_tokens=2, cross_node=True)
    m, h = cross.mask, len(tok("Head text. Sensors: ")["input_ids"])
    his = cross.his_pos.reshape(-1)
    for node in range(3):                 # each node's <ST_PRE> sees all history tokens, earlier and later nodes'
        assert m[cross.pre_pos[node], his].all()
        assert not m[cross.pre_pos[node], cross.pre_pos[(node + 1) % 3]]       # never another node's slot
    assert not m[:h, his].any()                                                 # the instruction sees no node
    # everything else is the per-node mask: the only additions are attention to history tokens
    extra = m & ~own.mask
    assert extra.any() and not extra[:, [p for p in range(len(cross.ids)) if p not in set(his.tolist())]].any()


def test_city_layout_needs_one_block_with_both_slots():
    tok = build_tiny_tokenizer()
    with pytest.raises(PromptError, match="exactly one"):
        city_layout("no block here <ST_HIS>", tok, 2, 1)
    with pytest.raises(PromptError, match="must hold exactly one"):
        city_layout("<NODES><ST_HIS></NODES>", tok, 2, 1)
    with pytest.raises(PromptError, match="must end with"):
        city_layout("<NODES><ST_HIS><ST_PRE></NODES> trailing words", tok, 2, 1)


def test_city_layout_reserves_the_when_slot_in_the_instruction():
    tok = build_tiny_tokenizer()
    text = "Head text. <WHEN> Sensors: <NODES><ST_HIS> then <ST_PRE>;</NODES>\n"
    layout = city_layout(text, tok, n_nodes=2, n_tokens=1, when_tokens=5)
    before = tok("Head text. ")["input_ids"]
    after = tok(" Sensors: ", add_special_tokens=False)["input_ids"]
    assert layout.when_pos.tolist() == list(range(len(before), len(before) + 5))
    h = len(before) + 5 + len(after)
    assert layout.ids[h - len(after):h].tolist() == after
    assert layout.his_pos[0, 0] == h                               # the node blocks follow the instruction
    assert layout.mask[layout.pre_pos][:, layout.when_pos].all()   # every node reads the calendar text
    plain = city_layout(text.replace("<WHEN> ", ""), tok, n_nodes=2, n_tokens=1)
    assert len(plain.when_pos) == 0


def test_the_when_slot_belongs_in_the_instruction_once():
    tok = build_tiny_tokenizer()
    with pytest.raises(PromptError, match="one <WHEN> slot"):
        city_layout("Head <WHEN> <NODES><ST_HIS><WHEN><ST_PRE></NODES>", tok, 2, 1, when_tokens=3)
    with pytest.raises(PromptError, match="one <WHEN> slot"):
        city_layout("<WHEN> and <WHEN> <NODES><ST_HIS><ST_PRE></NODES>", tok, 2, 1, when_tokens=3)


def test_city_calendar_template_is_the_city_template_with_the_when_slot():
    with_when = PromptTemplate.load("city_calendar").render(**CITY_FIELDS)
    assert with_when == GOLDEN_CITY.replace("every 1 hour. ", "every 1 hour. <WHEN> ")
