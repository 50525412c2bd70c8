"""The small synthetic world the demo GLM is trained on (`scripts/train_demo_model.py`).

A document tells one story about one person in English or Chinese: where they live, how many
things they have on a weekday, how many they get, the sum, the next weekday, and a summary.
Every fact is stated twice or follows from the others (a sum of two digits, the next weekday),
and the sentences always come in the same order, so every blank — a word, a sentence, the rest
of the text — is determined by the rest of the text. Names of people and cities are random
syllables: the model has to copy them from the context, it cannot have memorised them.

Documents are drawn from a `random.Random`, so a seed gives the same world on every machine.
"""

from __future__ import annotations

import random

EN_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
EN_VOWELS = ["a", "e", "i", "o", "u"]
EN_CODAS = ["", "", "", "n", "r", "l", "s"]
EN_ITEMS = ["apples", "books", "coins", "eggs", "pens", "shells", "cups", "kites"]
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

ZH_SURNAMES = list("王李张刘陈杨黄赵吴周徐孙马朱胡林郭何高罗")
ZH_GIVEN = list("明华军平芳娜敏静丽强磊洋艳勇杰娟涛超秀霞刚桂英")
ZH_PLACE = list("安宁东西南北山河江湖青白云海春秋松石金长")
ZH_CITY_SUFFIXES = ["城", "镇", "村"]
ZH_ITEMS = ["苹果", "橘子", "鸡蛋", "杯子", "气球", "铅笔", "贝壳", "风筝"]
ZH_DAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]

KNOWS = ("people with made-up names, the towns they live in, how many apples, books, coins "
         "(and a few other things) they have on a weekday, sums of two numbers from 2 to 9, "
         "and the next weekday — in English and in Chinese")


def _en_name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(EN_ONSETS) + rng.choice(EN_VOWELS) + rng.choice(EN_CODAS)
                   for _ in range(syllables))
    return word.capitalize()


TEMPLATES = {
    "en": ["{person} lives in {city}.",
           "On {day}, {person} has {a} {item}.",
           "{person} gets {b} more {item}.",
           "{a} plus {b} is {total}, so {person} now has {total} {item}.",
           "The day after {day} is {next_day}.",
           "So {person} from {city} had {a} {item} on {day}."],
    "zh": ["{person}住在{city}。",
           "{day}，{person}有{a}个{item}。",
           "{person}又拿到{b}个{item}。",
           "{a}加{b}等于{total}，所以{person}现在有{total}个{item}。",
           "{day}的下一天是{next_day}。",
           "所以住在{city}的{person}在{day}有{a}个{item}。"],
}
WORLD = {"en": (EN_ITEMS, EN_DAYS), "zh": (ZH_ITEMS, ZH_DAYS)}


def _tell(rng: random.Random, language: str, person: str, city: str) -> list[str]:
    """The story's sentences: the rest of its facts drawn, then the templates filled."""
    items, days = WORLD[language]
    item, day = rng.choice(items), rng.randrange(7)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    facts = dict(person=person, city=city, item=item, day=days[day],
                 next_day=days[(day + 1) % 7], a=a, b=b, total=a + b)
    return [template.format(**facts) for template in TEMPLATES[language]]


def english_story(rng: random.Random) -> list[str]:
    """The sentences of one English story."""
    person, city = _en_name(rng, rng.choice([2, 3])), _en_name(rng, rng.choice([2, 3]))
    return _tell(rng, "en", person, city)


def chinese_story(rng: random.Random) -> list[str]:
    """The sentences of one Chinese story."""
    person = rng.choice(ZH_SURNAMES) + "".join(rng.choices(ZH_GIVEN, k=rng.choice([1, 2])))
    city = "".join(rng.choices(ZH_PLACE, k=2)) + rng.choice(ZH_CITY_SUFFIXES)
    return _tell(rng, "zh", person, city)


def story(rng: random.Random, chinese_share: float = 0.5) -> tuple[str, str]:
    """One document: (language, text)."""
    if rng.random() < chinese_share:
        return "zh", "".join(chinese_story(rng))
    return "en", " ".join(english_story(rng))
