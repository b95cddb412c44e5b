"""PipeQL: a small made-up SQL dialect generated from a seeded grammar.

The fine-tuning domain of ``finetune_lm.py``. A query reads left to right as a pipe of
stages, and every table has a fixed schema, so a model has to learn both the syntax
and which columns belong to which table::

    from orders |> where total >= 40 and city = 'oslo' |> pick id, total |> sort total desc;
    from users |> join orders on users.id = orders.user_id |> count by city;
    put users (id, name, city) <- (17, 'ada', 'lima');

Nothing here is random without the caller's seed, so two runs see the same data.

Example:
  >>> import random
  >>> query(random.Random(0)).endswith(";")
  True
"""

from __future__ import annotations

import random

SCHEMAS: dict[str, tuple[str, ...]] = {
    "users": ("id", "name", "age", "city", "joined"),
    "orders": ("id", "user_id", "total", "city", "status"),
    "items": ("id", "order_id", "sku", "price", "qty"),
    "stores": ("id", "city", "size", "opened"),
}
NUMERIC = frozenset({"id", "age", "user_id", "total", "order_id", "price", "qty", "size"})
WORDS: dict[str, tuple[str, ...]] = {
    "name": ("ada", "linus", "grace", "guido", "barbara", "ken", "alan", "edsger"),
    "city": ("oslo", "lima", "kyoto", "porto", "quito", "dakar", "perth"),
    "status": ("open", "paid", "sent", "lost"),
    "sku": ("ab-12", "cd-34", "ef-56", "gh-78"),
    "joined": ("2021", "2022", "2023", "2024"),
    "opened": ("1999", "2005", "2013", "2020"),
}
JOINS = {("users", "orders"): ("id", "user_id"), ("orders", "items"): ("id", "order_id")}


def _value(rng: random.Random, column: str) -> str:
    if column in NUMERIC:
        return str(rng.randint(1, 99))
    return f"'{rng.choice(WORDS[column])}'"


def _condition(rng: random.Random, table: str) -> str:
    column = rng.choice(SCHEMAS[table])
    if column in NUMERIC:
        return f"{column} {rng.choice(('>', '<', '>=', '<=', '='))} {_value(rng, column)}"
    if rng.random() < 0.3:
        options = rng.sample(WORDS[column], 2)
        return f"{column} in ('{options[0]}', '{options[1]}')"
    return f"{column} {rng.choice(('=', '!='))} {_value(rng, column)}"


def _select(rng: random.Random) -> str:
    table = rng.choice(tuple(SCHEMAS))
    stages = [f"from {table}"]
    joinable = [pair for pair in JOINS if pair[0] == table]
    if joinable and rng.random() < 0.3:
        left, right = rng.choice(joinable)
        on_left, on_right = JOINS[(left, right)]
        stages.append(f"join {right} on {left}.{on_left} = {right}.{on_right}")
    if rng.random() < 0.8:
        conditions = [_condition(rng, table) for _ in range(rng.choice((1, 1, 2)))]
        stages.append("where " + f" {rng.choice(('and', 'or'))} ".join(conditions))
    if rng.random() < 0.25:
        stages.append(f"count by {rng.choice(SCHEMAS[table][1:])}")
    else:
        columns = rng.sample(SCHEMAS[table], rng.randint(1, 3))
        stages.append("pick " + ", ".join(columns))
        if rng.random() < 0.5:
            stages.append(f"sort {rng.choice(columns)} {rng.choice(('asc', 'desc'))}")
        if rng.random() < 0.5:
            stages.append(f"take {rng.randint(1, 20)}")
    return " |> ".join(stages) + ";"


def _insert(rng: random.Random) -> str:
    table = rng.choice(tuple(SCHEMAS))
    columns = SCHEMAS[table][: rng.randint(2, len(SCHEMAS[table]))]
    values = ", ".join(_value(rng, c) for c in columns)
    return f"put {table} ({', '.join(columns)}) <- ({values});"


def query(rng: random.Random) -> str:
    """One PipeQL statement (a pipe query four times in five, else an insert)."""
    return _select(rng) if rng.random() < 0.8 else _insert(rng)


def corpus(num_queries: int, *, seed: int) -> str:
    """``num_queries`` statements, one per line, from a ``random.Random(seed)``."""
    rng = random.Random(seed)
    return "\n".join(query(rng) for _ in range(num_queries)) + "\n"


if __name__ == "__main__":
    print(corpus(8, seed=0), end="")
