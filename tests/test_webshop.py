"""WebShop offline: the reward against hand-worked purchases (attributes, options, price, type, the colour
quirk), page texts and actions, search ranking, goals and splits, bad data paths and configs, one
co-evolution iteration as a subprocess, and, with the shared data, the goal count and the oracle."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from envs import get_spec
from envs.base import ConfigError
from envs.webshop import SPEC, WebshopConfig, WebshopEnv, oracle_action, parse_action, report
from envs.webshop_data import PRICE_SEED, DataError, SearchEngine, analyse, load_catalogue
from envs.webshop_reward import normalize_color, option_matches, reward, type_reward

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "webshop"
pytest.importorskip("bm25s")
pytest.importorskip("Stemmer")
pytest.importorskip("thefuzz")

PILLOW, BOOTS, TEA = "B000000001", "B000000002", "B000000003"
PILLOW_NAME = "Blue Cotton Throw Pillow Cover"


def product(asin, name, desc="", bullets=("",), pricing=(10.0,), options=None, cat="garden", query="q", path="A › B"):
    price = f"${pricing[0]}" if len(pricing) == 1 else f"${pricing[0]} to ${pricing[1]}"
    return {"asin": asin, "name": name, "Title": name, "Description": desc, "BulletPoints": list(bullets),
            "pricing": list(pricing), "Price": price, "options": options or {}, "category": cat, "query": query,
            "product_category": path, "Rating": "N.A.", "Reviews": []}


def tiny_products() -> tuple[list[dict], dict, dict]:
    """Three products with hand-workable rewards (two with goals: 6 + 2) and 12 mugs for paging."""
    products = [
        product(PILLOW, PILLOW_NAME, "A soft pillow cover with a zippered opening.", ["Double sided print"], (15.0,),
                {"color": ["navy blue", "light blue", "red"], "size": ["large", "standard"]}, "garden",
                "throw pillow covers", "Home & Kitchen › Decor › Pillows"),
        product(BOOTS, "Leather Hiking Boots", "Waterproof boots.", ["Rubber sole"], (40.0, 60.0),
                {"size": ["9", "10"]}, "fashion", "hiking boots", "Clothing › Men › Shoes › Boots"),
        product(TEA, "Organic Green Tea Bags", "Loose green tea.", ["100 bags"], (8.5,), {}, "grocery", "green tea",
                "Grocery › Beverages › Tea"),
    ] + [product(f"B0000001{i:02d}", f"Ceramic Coffee Mug {i}", "A mug" + " big" * i, cat="garden", query="mugs")
         for i in range(12)]
    ins = {PILLOW: {"attributes": ["machine washable", "double sided"], "instruction":
                    "Find me machine washable throw pillow covers", "instruction_attributes": ["machine washable"]},
           BOOTS: {"attributes": ["rubber sole"], "instruction": "Find me waterproof hiking boots",
                   "instruction_attributes": ["waterproof", "rubber sole"]},
           TEA: {"attributes": ["organic"]}}
    nouns = {p["name"]: [w.lower() for w in p["name"].split() if w[0].isupper() and not w.isdigit()]
             for p in products}
    return products, ins, nouns


def write_catalogue(root: Path, raw: bool = False, nouns: bool = True) -> Path:
    products, ins, names = tiny_products()
    root.mkdir(parents=True, exist_ok=True)
    if raw:  # a WebShop data/ folder: records as items_shuffle_1000.json holds them
        products = [{"asin": p["asin"], "name": p["name"], "full_description": p["Description"],
                     "small_description": p["BulletPoints"], "pricing": " ".join(f"${x}" for x in p["pricing"]),
                     "customization_options": {k.title(): [{"value": v.title().replace(" | ", "/")} for v in vals]
                                               for k, vals in p["options"].items()} or "",
                     "category": p["category"], "query": p["query"], "product_category": p["product_category"]}
                    for p in products]
    (root / ("items_shuffle_1000.json" if raw else "products_1000.json")).write_text(json.dumps(products))
    (root / "items_ins_v2_1000.json").write_text(json.dumps(ins))
    if nouns:
        (root / "title_nouns.json").write_text(json.dumps(names))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("webshop"))


def env_on(root, evaluation=False, **kw) -> WebshopEnv:
    return WebshopEnv(WebshopConfig(data_path=str(root), test_goals=2, **kw), evaluation=evaluation)


# -- the reward, worked by hand ------------------------------------------------------------------------
GOAL = {"asin": PILLOW, "query": "throw pillow covers", "name": PILLOW_NAME,
        "product_category": "Home & Kitchen › Decor › Pillows", "price_upper": 20.0,
        "attributes": ["machine washable", "double sided", "zippered", "hand wash"],
        "goal_options": {"color": "navy blue", "size": "large"}}
NOUNS = {PILLOW_NAME: ["cotton", "throw", "pillow", "cover"], "Leather Hiking Boots": ["leather", "hiking", "boots"]}


@pytest.mark.parametrize("options, price, goal_options, expected", [
    # attributes: washable (own attribute, fuzzy) + double sided (own) + zippered (in the description) = 3 of 4;
    # options 2 of 2; price 1: (3 + 2 + 1) / (4 + 2 + 1)
    ({"color": "navy blue", "size": "large"}, 15.0, None, 6 / 7),
    ({"color": "navy blue", "size": "large"}, 20.0, None, 6 / 7),  # at the cap: the price point
    ({"color": "navy blue", "size": "large"}, 25.0, None, 5 / 7),  # over the cap: no price point
    ({"color": "navy blue"}, 15.0, None, 5 / 7),  # no size chosen
    ({}, 15.0, None, 4 / 7),
    # colour quirk 1: "light blue" normalises to "blue", which matches the goal pair "color navy blue"
    ({"color": "light blue", "size": "large"}, 15.0, None, 6 / 7),
    ({"color": "red", "size": "large"}, 15.0, None, 5 / 7),  # a colour that is not in the pair misses
    # colour quirk 2: the right choice "standard" normalises to "tan" and misses the pair "size standard"
    ({"color": "navy blue", "size": "standard"}, 15.0, {"color": "navy blue", "size": "standard"}, 5 / 7),
    # a goal value that *is* a colour is normalised too (membership in the pair): "red" vs "red"
    ({"color": "red", "size": "large"}, 15.0, {"color": "red", "size": "large"}, 6 / 7),
])
def test_reward_by_hand(tiny, options, price, goal_options, expected):
    cat = load_catalogue(str(tiny))
    goal = {**GOAL, "goal_options": goal_options or GOAL["goal_options"]}
    total, parts = reward(cat.by_asin[PILLOW], goal, price, options, NOUNS)
    assert total == pytest.approx(expected) and parts["r_type"] == 1.0


def test_attributes_fuzzy_and_by_substring(tiny):
    cat = load_catalogue(str(tiny))
    pillow = cat.by_asin[PILLOW]
    assert pillow["Attributes"] == ["machine washable", "double sided"]  # from items_ins, as load_products sets
    one = lambda attr: reward(pillow, {**GOAL, "attributes": [attr], "goal_options": {}}, 1.0, {}, NOUNS)[0]
    assert one("washable") == 1.0  # token set of "machine washable" contains it: ratio 100
    assert one("zippered opening") == 1.0  # substring of the description
    assert one("sided print") == 1.0  # substring of the bullet points
    assert one("hand wash") == pytest.approx(1 / 2)  # ratio 56 with "machine washable", in no text: only price


@pytest.mark.parametrize("query, path, desired, bought, expected", [
    ("same", "X › Y", ["a", "b", "c", "d", "e"], ["z"], 0.0),  # no shared noun: 0 whatever else matches
    ("same", "X › Y", ["a"] * 10 + ["b"], ["b"], 0.1),  # 1 of 11 nouns (repeats count) < 0.1: 0.1
    ("other", "Q › R", ["a", "b", "c", "d", "e"], ["a"], 0.5),  # 0.2 is not > 0.2, no query or path match
    ("same", "Q › R", ["a", "b", "c", "d", "e"], ["a"], 1.0),  # ... the query matches
    ("other", "X › Y", ["a", "b", "c", "d", "e"], ["a"], 1.0),  # ... two category levels shared
    ("other", "X › R", ["a", "b", "c", "d", "e"], ["a"], 0.5),  # ... one level is not enough
    ("other", "Q › R", ["a", "b", "c", "d"], ["a"], 1.0),  # 0.25 > 0.2
    ("other", "Q › R", [], ["a"], 0.5),  # no nouns in the goal's name: title score 0.2
])
def test_type_reward(query, path, desired, bought, expected):
    goal = {"query": "same", "product_category": "X › Y › Z", "name": "goal"}
    bought_product = {"query": query, "product_category": path, "name": "bought"}
    assert type_reward(bought_product, goal, {"goal": desired, "bought": bought})["r_type"] == expected


def test_wrong_product_scores_by_type(tiny):
    cat = load_catalogue(str(tiny))
    assert reward(cat.by_asin[BOOTS], GOAL, 15.0, {}, NOUNS)[0] == 0.0  # no noun shared with the pillow
    socks = {**cat.by_asin[BOOTS], "name": "socks"}  # 1 noun of 4 shared: 0.25 > 0.2 -> r_type 1
    total, parts = reward(socks, GOAL, 15.0, {"size": "large"}, {**NOUNS, "socks": ["cotton", "socks"]})
    assert parts["r_type"] == 1.0 and total == pytest.approx((0 + 1 + 1) / 7)  # size large + price


def test_normalize_color_is_first_in_the_set_and_membership_for_pairs():
    assert normalize_color("navy blue") == "blue" and normalize_color("fashion black") == "ash"
    assert normalize_color(("color", "navy blue")) == ("color", "navy blue")
    assert normalize_color(("color", "navy")) == "navy"
    # so a pair whose value is a colour loses its name, and one whose value is not keeps it in the match
    assert option_matches(["color"], [("color", "red")]) == 0  # "color" vs "red"
    assert option_matches(["color"], [("color", "navy blue")]) == 1  # "color" vs "color navy blue": ratio 100


# -- pages and actions --------------------------------------------------------------------------------
def play_to_item(env):
    env.reset(0)
    env.step("search[pillow]")
    return env.step(f"click[{PILLOW.lower()}]")


def test_page_texts(tiny):
    env = env_on(tiny)
    obs = env.reset(0)
    assert obs.text == "Search\nAvailable actions: search[<your query>]." and obs.admissible == ["search[<your query>]"]
    obs, r, done, info = env.step("search[Pillows]")
    assert obs.text.splitlines()[0] == ("Back to Search [SEP] Page 1 (Total results: 1) [SEP] B000000001 [SEP] "
                                        "Blue Cotton Throw Pillow Cover [SEP] $15.0")
    assert obs.admissible == ["click[back to search]", "click[b000000001]"]
    obs, *_ = env.step("click[B000000001]")
    assert obs.text.splitlines()[0] == (
        "Back to Search [SEP] < Prev [SEP] color [SEP] navy blue [SEP] light blue [SEP] red [SEP] size [SEP] large "
        "[SEP] standard [SEP] Blue Cotton Throw Pillow Cover [SEP] Price: $15.0 [SEP] Rating: N.A. [SEP] "
        "Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    obs, *_ = env.step("click[red]")
    assert "\nChosen: color: red.\n" in obs.text and obs.feedback == "You chose color: red."
    assert env.step("click[description]")[0].text.splitlines()[0] == (
        "Back to Search [SEP] < Prev [SEP] A soft pillow cover with a zippered opening.")
    env.step("click[< prev]")
    assert env.page == "item" and env.options == {"color": "red"}  # a sub-page keeps the chosen options
    assert env.step("click[features]")[0].text.splitlines()[0] == "Back to Search [SEP] < Prev [SEP] Double sided print"
    short = env_on(tiny, max_field_chars=12)
    play_to_item(short)
    assert "[SEP] Blue Cotton... [SEP] Price" in short.page_text()


def test_paging_and_going_back(tiny):
    env = env_on(tiny)
    env.reset(0)
    obs, *_ = env.step("search[mug]")
    fields = obs.text.splitlines()[0].split(" [SEP] ")
    assert fields[:3] == ["Back to Search", "Page 1 (Total results: 12)", "Next >"] and len(fields) == 3 + 3 * 10
    assert "click[< prev]" not in obs.admissible
    obs, *_ = env.step("click[next >]")
    fields = obs.text.splitlines()[0].split(" [SEP] ")
    assert fields[:3] == ["Back to Search", "Page 2 (Total results: 12)", "< Prev"] and len(fields) == 3 + 3 * 2
    assert "click[next >]" not in obs.admissible
    env.step(f"click[{fields[3].lower()}]")  # open a mug on page 2, then back: page 2 again
    assert env.step("click[< prev]")[0].text.startswith("Back to Search [SEP] Page 2 (Total results: 12)")
    env.step("click[back to search]")
    assert (env.page, env.results, env.page_no) == ("search", [], 1)


def test_unavailable_and_invalid_actions_cost_a_step_and_change_nothing(tiny):
    env = env_on(tiny, max_steps=7)
    play_to_item(env)
    before = env.page_text()
    for action, penalty in [("click[next >]", -0.1), ("click[search]", -0.1), ("jump[x]", -0.1), (None, 0.0),
                            ("search[]", -0.1)]:
        obs, r, done, info = env.step(action)
        assert env.page_text() == before and r == penalty and info["invalid"] == (action is not None)
    assert info["invalid_commands"] == 4 and done and info["episode"] == {"score": 0.0}  # 7 steps: the budget
    with pytest.raises(RuntimeError, match="over"):
        env.step("click[buy now]")


def test_search_works_from_any_page_and_forgets_the_item(tiny):
    env = env_on(tiny)
    play_to_item(env)
    env.step("click[red]")
    obs, r, done, info = env.step("search[boots]")
    assert not info["invalid"] and env.page == "results" and env.options == {} and env.asin is None
    assert "B000000002" in obs.text


@pytest.mark.parametrize("mode, choice, score, rl_reward", [
    ("success", {"color": "navy blue", "size": "large"}, 1.0, 10.0),
    ("success", {"color": "red", "size": "large"}, 0.75, 0.0),
    ("score", {"color": "red", "size": "large"}, 0.75, 0.75),
])
def test_buy_now_ends_with_the_score(tiny, mode, choice, score, rl_reward):
    env = env_on(tiny, reward=mode)
    play_to_item(env)
    env.goal = {**env.cat.goals[0], **GOAL, "attributes": ["machine washable"], "price_upper": 1000000}
    for value in choice.values():
        env.step(f"click[{value}]")
    obs, r, done, info = env.step("click[buy now]")  # (1 + options + 1) / (1 + 2 + 1)
    assert done and r == rl_reward and info["success"] == (score == 1.0)
    assert info["episode"] == {"score": pytest.approx(score)} and "Your score" in obs.text


@pytest.mark.parametrize("text, expected", [
    ("Action: search[Red Shoes  for men]", "search[red shoes for men]"),
    (" click[B0000001]", "click[b0000001]"),
    ("click[ Buy Now ].", "click[buy now]"),
    ("I will CLICK[< Prev] then click[x]", "click[< prev]"),
    ("\n\nsearch['green tea']\nclick[a]", "search[green tea]"),
    ("search[]", None), ("buy it", None), ("", None), ("click [size: large]", "click[size: large]"),
    # option values as the real catalogue writes them: only the exact text clicks them, as in the original
    ('click[16" x 16"]', 'click[16" x 16"]'), ("click[18''x18'']", "click[18''x18'']"),
    ("click[B17-Army\xa0Green]", "click[b17-army\xa0green]"), ("click[8.4 ounce  |  250 ml]", "click[8.4 ounce  |  250 ml]"),
    ("click['16\" x 16\"']", 'click[16" x 16"]'), ("click['']", None),
])
def test_parse_action(text, expected):
    assert parse_action(text) == (expected, expected is not None)


# -- search ---------------------------------------------------------------------------------------------
def test_analyser_is_lucene_like():
    assert analyse("Men's 14.125-inch X-Large Shoes, the BEST 1,000 organic") == [
        "men", "14.125", "inch", "x", "larg", "shoe", "best", "1,000", "organ"]  # Porter (Porter2 keeps "organic")
    assert analyse("the of and with") == []


def test_bm25_scores_are_lucene_with_pyserini_settings():
    # docs: [red shoe shoe], [blue shoe], [red hat big big]; N 3, avgdl 3, idf = ln(1 + 1.5 / 2.5) for both terms;
    # Lucene: idf * tf / (tf + 0.9 * (0.6 + 0.4 * dl / avgdl)) summed over the query's terms
    docs = [product("d0", "red shoe shoes"), product("d1", "blue shoes"), product("d2", "red hat big big")]
    engine = SearchEngine(docs)
    idf = 0.47000363
    expected = [idf * (1 / 1.9 + 2 / 2.9), idf * (1 / (1 + 0.9 * (0.6 + 0.4 * 2 / 3))),
                idf * (1 / (1 + 0.9 * (0.6 + 0.4 * 4 / 3)))]
    assert engine.scores("red shoes").tolist() == pytest.approx(expected, rel=1e-5)
    assert engine.search("red shoes") == [0, 1, 2] and engine.search("hat") == [2] and engine.search("the") == []
    assert engine.search("shoe shoe")[:1] == [0]  # a repeated query term counts twice, as pyserini's boost


def test_ranking_on_the_tiny_catalogue(tiny):
    cat = load_catalogue(str(tiny))
    asins = lambda q: [cat.products[i]["asin"] for i in cat.engine.search(q)]
    assert asins("waterproof boot") == [BOOTS]  # stemmed: boots -> boot
    assert asins("navy pillow") == [PILLOW]  # option values are indexed
    mugs = asins("big mug")  # more "big" wins, despite the longer text (b = 0.4)
    assert mugs[0] == "B000000111" and len(mugs) == 12
    twins = SearchEngine([product("a", "same text"), product("b", "same text")])
    assert twins.search("text") == [0, 1]  # a tie goes to the earlier product, as in Lucene


# -- goals, splits, registration ------------------------------------------------------------------------------
def test_goals_are_every_option_combination_shuffled_with_seed_233(tiny):
    cat = load_catalogue(str(tiny))
    made = [(PILLOW, c, s) for c in ("navy blue", "light blue", "red") for s in ("large", "standard")]
    made += [(BOOTS, None, "9"), (BOOTS, None, "10")]
    random.Random(233).shuffle(made)
    assert [(g["asin"], g["goal_options"].get("color"), g["goal_options"]["size"]) for g in cat.goals] == made
    # one seeded stream: the boots' price in its range first (products in order), then each product's cap, the
    # larger of two of the first four $10 steps above its price
    rng = random.Random(PRICE_SEED)
    boots_price = rng.uniform(40.0, 60.0)
    pillow_cap = sorted(rng.sample([20.0, 30.0, 40.0, 50.0], 2))[1]
    steps = [10.0 * i for i in range(1, 100) if 10.0 * i > boots_price][:4]
    boots_cap = sorted(rng.sample(steps, 2))[1]
    assert cat.prices == {**cat.prices, PILLOW: 15.0, BOOTS: boots_price, TEA: 8.5}
    assert {g["asin"]: g["price_upper"] for g in cat.goals} == {PILLOW: pillow_cap, BOOTS: boots_cap}
    pillow = next(g for g in cat.goals if g["goal_options"] == {"color": "red", "size": "large"})
    assert pillow["instruction_text"] == ("Find me machine washable throw pillow covers with color: red, and size: "
                                          f"large, and price lower than {pillow_cap:.2f} dollars")


def test_seeds_pick_test_and_training_goals(tiny):
    from envs.seeds import eval_seeds
    pool = SPEC.pool(WebshopConfig(data_path=str(tiny), test_goals=5), evaluation=True)
    pool.reset(eval_seeds(5))  # the i-th evaluation seed plays the i-th test goal
    assert [info["goal"] for info in pool.infos] == [0, 1, 2, 3, 4]
    assert pool.tasks == [g["instruction_text"] for g in load_catalogue(str(tiny)).goals[:5]]
    train = SPEC.pool(WebshopConfig(data_path=str(tiny), test_goals=5))
    train.reset([0, 4, 6, 13])
    assert [info["goal"] for info in train.infos] == [5, 6, 5, 6]  # 5 + seed % 3
    assert train.task_types[0] == load_catalogue(str(tiny)).goals[2]["category"]


def test_registered_with_score_report():
    assert get_spec("webshop") is SPEC and set(SPEC.task_types) == {"beauty", "electronics", "fashion", "garden",
                                                                       "grocery"}
    assert report([{"score": 1.0}, {"score": 0.5}, {"success": False}]) == {"score": 50.0}
    assert report([]) == {}


# -- bad data and configs --------------------------------------------------------------------------------------
def test_bad_data_paths_name_the_path(monkeypatch, tmp_path):
    monkeypatch.delenv("WEBSHOP_DATA", raising=False)
    with pytest.raises(DataError, match=r"'data_path' is empty and \$WEBSHOP_DATA is unset"):
        WebshopEnv(WebshopConfig())
    with pytest.raises(DataError, match=f"'{tmp_path / 'nowhere'}' does not exist"):
        SPEC.pool(WebshopConfig(data_path=str(tmp_path / "nowhere")))  # at start-up, in the trainer
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "products_1000.json").write_text("[]")
    with pytest.raises(DataError, match=r"has neither .* \(it has: \['products_1000.json'\]\)"):
        WebshopEnv(WebshopConfig(data_path=str(tmp_path / "half")))


def test_a_webshop_data_folder_and_the_env_var(monkeypatch, tmp_path):
    root = write_catalogue(tmp_path / "data", raw=True)
    monkeypatch.setenv("WEBSHOP_DATA", str(root))
    env = WebshopEnv(WebshopConfig(test_goals=2))
    boots = env.cat.by_asin[BOOTS]
    assert boots["Price"] == "$40.0 to $60.0" and boots["pricing"] == [40.0, 60.0] and boots["Title"] == boots["name"]
    assert env.cat.by_asin[PILLOW]["options"] == {"color": ["navy blue", "light blue", "red"],
                                                  "size": ["large", "standard"]}
    assert [g["instruction_text"] for g in env.cat.goals] == [
        g["instruction_text"] for g in load_catalogue(str(write_catalogue(tmp_path / "copy"))).goals]


def test_without_title_nouns_and_spacy_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "spacy", None)
    monkeypatch.setenv("HIMAC_CACHE", str(tmp_path / "cache"))
    root = write_catalogue(tmp_path / "data", raw=True, nouns=False)
    with pytest.raises(DataError, match="no title_nouns.json in .*pip install spacy"):
        WebshopEnv(WebshopConfig(data_path=str(root), test_goals=2))


@pytest.mark.parametrize("key, value, why", [("reward", "points", "is not one of"), ("max_steps", 0, ">= 1"),
                                             ("test_goals", 0, ">= 1"), ("max_field_chars", -1, ">= 0")])
def test_bad_config_values_name_the_key(key, value, why):
    with pytest.raises(ConfigError, match=f"'{key}' = .*{why}"):
        WebshopConfig(**{key: value})


def test_too_many_test_goals_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="'test_goals' = 8: the catalogue at .* has 8 goals"):
        SPEC.pool(WebshopConfig(data_path=str(tiny), test_goals=8))


def test_envs_import_without_the_webshop_packages(tiny):
    code = ("import sys\n"
            "for m in ('bm25s', 'Stemmer', 'thefuzz'): sys.modules[m] = None  # as if not installed\n"
            "import envs  # himac is not needed to show it, and torch's import is slow on a busy machine\n"
            "from envs.webshop import WebshopConfig\n"
            f"try: envs.get_spec('webshop').pool(WebshopConfig(data_path={str(tiny)!r}))\n"
            "except ImportError as e: print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError: the webshop env needs ['bm25s', 'Stemmer', 'thefuzz']: pip install -e '.[webshop]'" \
        in proc.stdout


# -- one co-evolution iteration, as a user runs it -------------------------------------------------------------
def test_one_coevolve_iteration_on_the_tiny_catalogue(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["configs/webshop_cpu.yaml", "--out", str(out), "--set", f"data_path={tiny}", "--set", "test_goals=2",
            "--set", "model=tiny", "--set", "load_in_4bit=false", "--set", "iterations=1",
            "--set", "tasks_per_iteration=2", "--set", "group_size=2", "--set", "rollouts_per_blueprint=2",
            "--set", "blueprint_max_tokens=12", "--set", "action_max_tokens=8", "--set", "max_steps=3",
            "--set", "eval_episodes=2"]
    proc = subprocess.run([sys.executable, "-m", "himac.coevolve", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["env/steps"] > 0 and m["env/end_env_error"] == 0.0 and 0.0 <= m["env/score"] <= 100.0
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [-1, 0]
    assert all(e["eval/episodes_run"] == 2 and 0.0 <= e["eval/score"] <= 100.0 for e in evals)


# -- the real data (the shared copy, when present) --------------------------------------------------------------
@pytest.mark.skipif(not (SHARED / "products_1000.json").is_file(), reason="shared WebShop data absent")
def test_real_goals_and_the_oracle():
    env = WebshopEnv(WebshopConfig(data_path=str(SHARED), max_steps=30), evaluation=True)
    assert len(env.cat.products) == 1000 and len(env.cat.goals) == 6910
    for g in env.cat.goals:  # the cap: one of the first four $10 steps above the price, never the first
        steps = [10.0 * i for i in range(1, 100) if 10.0 * i > env.cat.prices[g["asin"]]][:4]
        assert g["price_upper"] in steps[1:] if len(steps) >= 2 else g["price_upper"] == 1000000
    found = 0
    for i in range(env.cfg.test_goals):
        env.reset(i)
        seen, done = False, False
        while not done and (action := oracle_action(env)) is not None:
            seen |= env.page == "results" and action.startswith("click[b")
            _, _, done, info = env.step(action)
        found += seen
        if seen and env.score < 1.0:  # only the colour quirk takes points off the right purchase
            parts, goal = env.parts, env.goal
            quirky = [v for v in goal["goal_options"].values() if normalize_color(v) != v]
            missed = round((1 - parts["r_option"]) * len(goal["goal_options"]))
            assert (parts["r_type"], parts["r_att"], parts["r_price"]) == (1.0, 1.0, True) and 0 < missed <= len(quirky)
        elif seen:
            assert info["success"] and info["episode"]["score"] == 1.0
    assert found / env.cfg.test_goals > 0.85  # 0.908 measured: searching the goal text finds most on page one


@pytest.mark.skipif(not (SHARED / "products_1000.json").is_file(), reason="shared WebShop data absent")
def test_real_goal_product_loses_points_only_to_the_option_quirk():
    """Whatever the search, buying the goal product with the goal's options scores 1.0 on 480 of the 500 test
    goals; the other 20 lose option points to the (name, value) pair quirk, never type, attribute or price
    points. So an oracle's success is at least its found share minus 4.0 points (docs/webshop.md)."""
    cat = load_catalogue(str(SHARED))
    below = []
    for i, goal in enumerate(cat.goals[:500]):
        total, parts = reward(cat.by_asin[goal["asin"]], goal, cat.prices[goal["asin"]], dict(goal["goal_options"]),
                              cat.nouns)
        assert (parts["r_type"], parts["r_att"], parts["r_price"]) == (1.0, 1.0, True)
        if total < 1.0:
            below.append(i)
            assert parts["r_option"] < 1.0
    assert len(below) == 20 and below[:3] == [20, 28, 73]
    # every option value of the catalogue survives parse_action, so a model can choose it by copying it
    values = {v for p in cat.products for vs in p["options"].values() for v in vs}
    assert all(parse_action(f"click[{v}]")[0] == f"click[{v}]" for v in values)
