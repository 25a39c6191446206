"""WebShop (paper §4.1, Table 1) offline: the text environment of princeton-nlp/WebShop on its
1000-product data, with the original reward; no Java, no web server, no network.

The reference is WebShop's `web_agent_site/envs/web_agent_text_env.py` (text mode): the
pages it renders and how `search[...]` / `click[...]` move between them are rebuilt here
directly, without its Flask templates and HTML parsing. Catalogue, goals and search live in
envs/webshop_data.py, the reward in envs/webshop_reward.py (each says how it departs).

Pages (fields joined by " [SEP] ", as the original's text mode joins the visible texts):
search page ("Search"); results, 10 a page of the top 50 ("Back to Search", "Page 1 (Total
results: 50)", "< Prev" / "Next >" where there is such a page, then id, title and price of
each product); item page (buttons, each option name and its values, title, "Price: ...",
"Rating: ...", "Description", "Features", "Reviews", "Buy Now"); the description, features
and reviews sub-pages ("Back to Search", "< Prev", then the text). The instruction, which
the original prints at the top of every page, is left out: the prompts carry it as the task.

Actions, as in the original's step(): `search[keywords]` runs a search from any page (the
search bar is listed only on the search page, but the original's step accepts it anywhere);
`click[value]` clicks a button, a product id on a results page or an option value on an item
page, compared in lower case. Anything else, and `click[search]`, changes nothing: it costs a
step and `invalid_command_penalty`, and is counted (info["invalid"]). Text that is no action
at all is `None` (the executor prices it). "Buy Now" ends the episode with the reward of the
purchase: info["episode"]["score"] is that reward in [0, 1] (0 when the budget ends first) and
success is a reward of exactly 1.0. The RL reward is `success_reward` on success (verl-agent's
10) or, with `reward: score`, the score itself. `max_steps` (15) ends the episode unbought.
Additions for a small model: the observation lists the available actions (as verl-agent's
prompt does), names the options chosen so far on an item page (the original's text mode does
not show them), and `max_field_chars` can shorten long titles and descriptions.

Goals: the shuffled goal list (6910 on the real data) is split as verl-agent splits it: the
first `test_goals` (500) are held out, the rest train. Training seed s plays training goal
s % n_train; the i-th evaluation seed (envs.seeds.eval_seeds) plays the i-th test goal, so
`eval_episodes: 500` plays each test goal once, in the original's order.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from envs.base import ConfigError, EnvSpec, Obs, Prompts, Range, SerialPool, validate
from envs.seeds import eval_seeds
from envs.webshop_data import PAGE_SIZE, data_root, load_catalogue, require_webshop
from envs.webshop_reward import reward as purchase_reward

TASK_TYPES = ("beauty", "electronics", "fashion", "garden", "grocery")  # the products' `category`
SEP = " [SEP] "
BACK, PREV, NEXT, BUY = "Back to Search", "< Prev", "Next >", "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
NOTHING_HAPPENS = "Nothing happens."
_ACTION = re.compile(r"\b(search|click)\s*\[(.*?)\]", re.IGNORECASE)


@dataclass
class WebshopConfig:
    data_path: str = ""
    """(infra) Folder with products_1000.json + items_ins_v2_1000.json + title_nouns.json, or a WebShop data/
    folder (items_shuffle_1000.json + items_ins_v2_1000.json); '' reads $WEBSHOP_DATA."""
    max_steps: Annotated[int, Range(ge=1)] = 15
    """(paper) Episode horizon in env steps (paper §4.1: 15)."""
    reward: Literal["success", "score"] = "success"
    """(paper) RL reward on Buy Now: 'success' (success_reward when the purchase scores 1.0, as verl-agent) or
    'score' (the purchase's score in [0, 1])."""
    success_reward: float = 10.0
    """(paper) Reward for a purchase scoring 1.0 when reward is 'success'."""
    invalid_command_penalty: float = -0.1
    """(paper) Reward of a well-formed action that is not available on the page (it changes nothing)."""
    test_goals: Annotated[int, Range(ge=1)] = 500
    """(paper) The first this many goals of the shuffled list are held out for evaluation; the rest train."""
    max_field_chars: Annotated[int, Range(ge=0)] = 0
    """(departure) Cut each title, description and bullet point shown to this many characters (0: whole, as
    the original): a 135M model's prompt budget."""

    def __post_init__(self):
        validate(self)


def parse_action(text: str) -> tuple[str | None, bool]:
    """Model text -> ('search[...]' or 'click[...]' with its argument lower-cased, valid) from the first line.

    The first bracketed action on the first non-empty line counts; whether it is available
    on the page is the env's to judge. One pair of quotes around the whole argument goes. A
    click's argument is otherwise kept as written, as the original's step() keeps it: option
    values end in inch marks ('16" x 16"', "18''x18''") or hold double and no-break spaces, and
    only the exact text clicks them. A search's spaces are collapsed (the search splits on them).
    """
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _ACTION.search(line)
        if m is None:
            return None, False
        name, arg = m.group(1).lower(), m.group(2).strip()
        if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "`'\"":
            arg = arg[1:-1].strip()
        arg = " ".join(arg.lower().split()) if name == "search" else arg.lower()
        return (f"{name}[{arg}]", True) if arg else (None, False)
    return None, False


class WebshopEnv:
    """One shopping episode at a time on the shared (per-process) catalogue."""

    def __init__(self, cfg: WebshopConfig, evaluation: bool = False, seed_index: dict[int, int] | None = None):
        require_webshop()
        self.cfg, self.evaluation, self.seed_index = cfg, evaluation, seed_index or {}
        self.cat = load_catalogue(str(data_root(cfg.data_path)))
        n = len(self.cat.goals)
        if cfg.test_goals >= n:
            raise ConfigError(f"config key 'test_goals' = {cfg.test_goals}: the catalogue at {self.cat.root} has "
                              f"{n} goals; at least one must be left for training")
        self.task, self.task_type, self.episode_info = "", "", {}
        self.goal: dict | None = None

    def reset(self, seed: int) -> Obs:
        n_test, n_train = self.cfg.test_goals, len(self.cat.goals) - self.cfg.test_goals
        index = self.seed_index.get(seed, seed % n_test) if self.evaluation else n_test + seed % n_train
        self.goal = self.cat.goals[index]
        self.task, self.task_type = self.goal["instruction_text"], self.goal["category"]
        self.episode_info = {"goal": index, "asin": self.goal["asin"]}
        self.steps, self.invalid, self.done = 0, 0, False
        self.page, self.keywords, self.results, self.page_no = "search", "", [], 1
        self.asin: str | None = None
        self.options: dict[str, str] = {}
        self.score, self.parts = 0.0, {}  # the purchase's reward and its parts, set by Buy Now
        return self._obs("You are on the search page.")

    # -- pages ------------------------------------------------------------------------------
    def clickables(self) -> dict[str, tuple[str, str]]:
        """Lower-cased clickable text -> (kind, what) on the current page."""
        out = {}
        if self.page in ("results", "item") or self.page in SUB_PAGES:
            out[BACK.lower()] = ("button", BACK)
        if self.page == "results":
            if self.page_no > 1:
                out[PREV.lower()] = ("button", PREV)
            if self.page_no * PAGE_SIZE < len(self.results):
                out[NEXT.lower()] = ("button", NEXT)
            out.update({p["asin"].lower(): ("product", p["asin"]) for p in self._shown()})
        elif self.page == "item":
            out[PREV.lower()] = ("button", PREV)
            for name, values in self._product()["options"].items():
                out.update({v: ("option", name) for v in values})  # a value in two options: the later wins
            out.update({b.lower(): ("button", b) for b in (*SUB_PAGES, BUY)})
        elif self.page in SUB_PAGES:
            out[PREV.lower()] = ("button", PREV)
        return out

    def page_text(self) -> str:
        """The current page as the original's text mode shows it (less the instruction)."""
        cut = self._cut
        if self.page == "search":
            return "Search"
        if self.page == "done":
            return SEP.join(["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", f"{self.score}"])
        if self.page == "results":
            fields = [BACK, f"Page {self.page_no} (Total results: {len(self.results)})"]
            fields += [PREV] if self.page_no > 1 else []
            fields += [NEXT] if self.page_no * PAGE_SIZE < len(self.results) else []
            for p in self._shown():
                fields += [p["asin"], cut(p["Title"]), p["Price"]]
            return SEP.join(fields)
        p, fields = self._product(), [BACK, PREV]
        if self.page == "item":
            for name, values in p["options"].items():
                fields += [name, *values]
            fields += [cut(p["Title"]), f"Price: {p['Price']}", f"Rating: {p['Rating']}", *SUB_PAGES, BUY]
        elif self.page == "Description":
            fields.append(cut(p["Description"]))
        elif self.page == "Features":
            fields += [cut(b) for b in p["BulletPoints"]]
        else:  # Reviews: none in the 1000-product data (the original's load_products leaves them empty)
            fields += [str(x) for r in p.get("Reviews", []) for x in (r.get("title", ""), r.get("score", ""),
                                                                     r.get("body", ""))]
        return SEP.join(fields)

    def available_actions(self) -> list[str]:
        search = ["search[<your query>]"] if self.page == "search" else []
        return search + [f"click[{c}]" for c in self.clickables()]

    def _obs(self, feedback: str) -> Obs:
        actions = self.available_actions()
        text = self.page_text()
        if self.page == "item" and self.options:
            text += "\nChosen: " + ", ".join(f"{k}: {v}" for k, v in self.options.items()) + "."
        if actions:
            text += "\nAvailable actions: " + ", ".join(actions) + "."
        return Obs(text=text, feedback=feedback, admissible=actions)

    def _cut(self, s: str) -> str:
        n = self.cfg.max_field_chars
        return s if not n or len(s) <= n else s[:n].rstrip() + "..."

    def _shown(self) -> list[dict]:
        start = (self.page_no - 1) * PAGE_SIZE
        return [self.cat.products[i] for i in self.results[start:start + PAGE_SIZE]]

    def _product(self) -> dict:
        return self.cat.by_asin[self.asin]

    # -- actions ----------------------------------------------------------------------------
    def step(self, action: str | None) -> tuple[Obs, float, bool, dict]:
        if self.goal is None or self.done:
            raise RuntimeError("call reset(seed) before step()" if self.goal is None else "the episode is over")
        self.steps += 1
        reward, invalid, feedback, bought = 0.0, False, NOTHING_HAPPENS, False
        if action is not None:
            m = re.fullmatch(r"(search|click)\[(.*)\]", action.strip(), flags=re.DOTALL)
            name, arg = (m.group(1), m.group(2).strip().lower()) if m else ("", "")
            clickable = self.clickables().get(arg)
            if name == "search" and arg:
                feedback = self._search(arg)
            elif name == "click" and clickable is not None:
                feedback, bought = self._click(arg, *clickable)
            else:  # not available here: changes nothing, as in the original
                invalid, reward = True, self.cfg.invalid_command_penalty
                self.invalid += 1
                feedback = f"Nothing happens: {action} is not available here."
        success = bought and self.score == 1.0
        if bought:
            reward += (self.cfg.success_reward if success else 0.0) if self.cfg.reward == "success" else self.score
        self.done = bought or self.steps >= self.cfg.max_steps
        info = {"success": success, "steps": self.steps, "invalid": invalid, "invalid_commands": self.invalid}
        if self.done:
            info["episode"] = {"score": self.score if bought else 0.0}
        return self._obs(feedback), reward, self.done, info

    def _search(self, keywords: str) -> str:
        self.keywords, self.results = keywords, self.cat.engine.search(keywords)
        self._to_results(1)
        return f"You searched '{keywords}': {len(self.results)} results."

    def _to_results(self, page_no: int) -> None:
        # the original re-renders the results page through search_results(), which forgets the item
        self.page, self.page_no, self.asin, self.options = "results", page_no, None, {}

    def _click(self, arg: str, kind: str, what: str) -> tuple[str, bool]:
        """Follow a click that is available; -> (feedback, bought)."""
        if kind == "product":
            self.page, self.asin = "item", what
            return f"You opened {what}.", False
        if kind == "option":
            self.options[what] = arg
            return f"You chose {what}: {arg}.", False
        if what == BACK:
            self._back_to_search()
            return "You are back on the search page.", False
        if what in (NEXT, PREV) and self.page == "results":
            self._to_results(self.page_no + (1 if what == NEXT else -1))
            return f"Results page {self.page_no}.", False
        if what == PREV and self.page == "item":
            self._to_results(self.page_no)
            return f"Back to the results, page {self.page_no}.", False
        if what == PREV:  # from a sub-page to its item page, the chosen options kept
            self.page = "item"
            return f"Back to {self.asin}.", False
        if what in SUB_PAGES:
            self.page = what
            return f"You opened the {what.lower()} of {self.asin}.", False
        # Buy Now
        product = self._product()
        self.score, self.parts = purchase_reward(product, self.goal, self.cat.prices[self.asin], self.options,
                                                 self.cat.nouns)
        self.page = "done"
        return f"You bought {self.asin}; score {self.score:.2f}.", True

    def _back_to_search(self) -> None:
        """Back to Search: the original starts the session over (keywords, page, item and options)."""
        self.page, self.keywords, self.results, self.page_no, self.asin, self.options = "search", "", [], 1, None, {}

    def close(self) -> None:
        pass


def oracle_action(env: WebshopEnv, pages: int = 1) -> str | None:
    """The next action of an agent that knows the goal: search the instruction, open the goal product if it
    is on the first `pages` results pages, choose the goal's options, buy. None: the product was not found."""
    goal = env.goal
    if env.page == "search":
        return f"search[{env.task}]"
    if env.page == "results":
        if goal["asin"] in {p["asin"] for p in env._shown()}:
            return f"click[{goal['asin'].lower()}]"
        return "click[next >]" if env.page_no < pages and NEXT.lower() in env.clickables() else None
    if env.page != "item" or env.asin != goal["asin"]:
        return f"click[{PREV.lower()}]"
    clickables = env.clickables()
    for name, value in goal["goal_options"].items():
        if env.options.get(name) != value and clickables.get(value) == ("option", name):
            return f"click[{value}]"
    return f"click[{BUY.lower()}]"


def make_pool(spec: EnvSpec, cfg: WebshopConfig, evaluation: bool):
    """The envs of a batch, stepped in this process (a step takes well under a millisecond).

    The data are resolved and loaded here, in the trainer, so a bad path fails at start-up
    with its message. On the evaluation side the i-th evaluation seed plays the i-th test goal.
    """
    require_webshop()
    cfg = dataclasses.replace(cfg, data_path=str(data_root(cfg.data_path)))
    WebshopEnv(cfg, evaluation)  # loads the catalogue (cached per process); a bad test_goals raises now
    seed_index = dict(zip(eval_seeds(cfg.test_goals), range(cfg.test_goals))) if evaluation else None
    make = functools.partial(WebshopEnv, evaluation=evaluation, seed_index=seed_index)
    return SerialPool(dataclasses.replace(spec, make=make), cfg)


def report(episodes: list[dict]) -> dict:
    """WebShop's score: 100 x the mean purchase reward (an episode without a purchase scores 0)."""
    if not episodes:
        return {}
    return {"score": 100.0 * sum(float(e.get("score") or 0.0) for e in episodes) / len(episodes)}


_SHOP = ("You shop in a text web shop (WebShop): search with keywords, open a product from the results, "
         "choose its options (size, color, ...) and buy it with Buy Now. ")
_ACT = ("Each turn, answer with exactly one action: search[keywords], or click[value] with a value from the "
        "available actions, copied word for word.")
PROMPTS = Prompts(
    planner_system=(_SHOP + "Write a plan of at most {max_subgoals} short sub-goals, one per line, "
                    "numbered 1., 2., ..."),
    planner_user="Task: {task}\nWhat you see:\n{observation}\nWrite the numbered plan.",
    planner_prefix="1.",
    executor_system=_SHOP + _ACT,
    executor_user=("Task: {task}\nSub-goal ({index}/{count}): {subgoal}\n{history}Now:\n{observation}\n"
                   "Answer with one available action.{sub_done_rule}"),
    executor_prefix="Action:",
    flat_system=_SHOP + _ACT,
    flat_user="Task: {task}\n{history}Now:\n{observation}\nAnswer with one available action.",
    flat_prefix="Action:",
)

SPEC = EnvSpec(name="webshop", config=WebshopConfig, make=WebshopEnv, parse_action=parse_action, prompts=PROMPTS,
               task_types=TASK_TYPES, make_pool=make_pool, report=report)
