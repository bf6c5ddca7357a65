"""The shortcut audit's tables (audits, strategies, strategy_members; db_schema.py's migrations 4
and 5): ExplanationDB's add_audit and audit, kept here so db.py stays about the maps.

    with ExplanationDB(path) as db:
        audit_id = db.add_audit(model_id=m, setting_id=s, dataset=d, size=28, split="test", params={...},
                                strategies=[...], members={...})   # audit_run.py builds both
        stored = db.audit(model_id=m, setting_id=s, dataset=d, size=28, split="test")
"""
from __future__ import annotations

import json
import sqlite3

import numpy as np

from db_schema import canonical_json, floats, ints, plain

# The shortcut audit's columns (db_schema.py's migrations 4 and 5; audit.py says what each measures;
# x, y: the map's place on the map of the data set, mosaic.layout).
STRATEGY_COLUMNS = ("class", "rank", "n", "suspicion", "flip", "control_flip", "atypical", "area", "concentration",
                    "prob_drop")
MEMBER_COLUMNS = ("flip", "control_flip", "atypical", "area", "concentration", "x", "y")


class AuditTables:
    """Mixed into ExplanationDB, whose _conn and _transaction it uses."""

    def add_audit(self, *, model_id: int, setting_id: int, dataset: str, size: int, split: str, params: dict,
                  strategies: list[dict], members: dict[str, np.ndarray]) -> int:
        """Store a shortcut audit (audit.py) of these maps in one transaction, replacing the audit of
        the same (model, setting, data). strategies: dicts of STRATEGY_COLUMNS (rank 1: the class's
        most suspicious) with "exemplars", attribution ids; members: per audited map its
        "attribution_id", "strategy" (position in `strategies`) and MEMBER_COLUMNS. Returns the id."""
        ids = ints("attribution_id", members["attribution_id"])
        where = ints("strategy", members["strategy"], len(ids))
        if len(ids) and (where.min() < 0 or where.max() >= len(strategies)):
            raise ValueError("add_audit: a member's strategy is not one of the strategies given")
        cols = {c: floats(c, members[c], len(ids)) for c in MEMBER_COLUMNS}
        key = (int(model_id), int(setting_id), str(dataset), int(size), str(split))
        try:
            with self._transaction() as conn:
                conn.execute("DELETE FROM audits WHERE (model_id, setting_id, dataset, size, split) = (?, ?, ?, ?, ?)", key)
                # A map audited before under another audit (another selection of the same maps) moves here.
                conn.execute("DELETE FROM strategy_members WHERE attribution_id IN (SELECT value FROM json_each(?))",
                             (json.dumps(ids.tolist()),))
                audit_id = conn.execute("INSERT INTO audits(model_id, setting_id, dataset, size, split, n_maps, "
                                        "params_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                        (*key, len(ids), canonical_json(plain(params)))).lastrowid
                sids = [conn.execute(
                    f"INSERT INTO strategies(audit_id, {', '.join(STRATEGY_COLUMNS)}, exemplars_json) "
                    f"VALUES (?, {', '.join('?' * len(STRATEGY_COLUMNS))}, ?)",
                    (audit_id, *(plain(s[c]) for c in STRATEGY_COLUMNS),
                     json.dumps(ints("exemplars", s["exemplars"]).tolist()))).lastrowid for s in strategies]
                conn.executemany(f"INSERT INTO strategy_members(attribution_id, strategy_id, {', '.join(MEMBER_COLUMNS)}) "
                                 f"VALUES (?, ?, {', '.join('?' * len(MEMBER_COLUMNS))})",
                                 zip(ids.tolist(), [sids[w] for w in where.tolist()],
                                     *(cols[c].tolist() for c in MEMBER_COLUMNS)))
        except sqlite3.IntegrityError as e:
            raise ValueError(f"add_audit: {e} (unknown model, setting or attribution id?); nothing was stored") from e
        return audit_id

    def audit(self, *, model_id: int, setting_id: int, dataset: str, size: int, split: str) -> dict | None:
        """The stored audit of these maps, or None: its params, n_maps and created_at, "strategies"
        (dicts of STRATEGY_COLUMNS with "id" and "exemplars", by class then rank) and "members"
        (arrays: attribution_id, strategy_id, index, target, label, predicted and MEMBER_COLUMNS)."""
        key = (int(model_id), int(setting_id), str(dataset), int(size), str(split))
        row = self._conn.execute("SELECT id, n_maps, params_json, created_at FROM audits "
                                 "WHERE (model_id, setting_id, dataset, size, split) = (?, ?, ?, ?, ?)", key).fetchone()
        if row is None:
            return None
        strategies = [dict(zip(("id", *STRATEGY_COLUMNS, "exemplars"), (*r[:-1], json.loads(r[-1])))) for r in
                      self._conn.execute(f"SELECT id, {', '.join(STRATEGY_COLUMNS)}, exemplars_json FROM strategies "
                                         "WHERE audit_id = ? ORDER BY class, rank", (row[0],))]
        names = ("attribution_id", "strategy_id", "index", "target", "label", "predicted", *MEMBER_COLUMNS)
        rows = self._conn.execute(
            f"SELECT m.attribution_id, m.strategy_id, x.idx, a.target, x.label, a.predicted, "
            f"{', '.join('m.' + c for c in MEMBER_COLUMNS)} FROM strategy_members m "
            "JOIN strategies s ON s.id = m.strategy_id JOIN attributions a ON a.id = m.attribution_id "
            "JOIN samples x ON x.id = a.sample_id WHERE s.audit_id = ? ORDER BY m.attribution_id", (row[0],)).fetchall()
        cols = list(zip(*rows)) if rows else [()] * len(names)
        members = {n: np.array(v, dtype=np.float64 if n in MEMBER_COLUMNS else np.int64) for n, v in zip(names, cols)}
        return {"id": row[0], "n_maps": row[1], "params": json.loads(row[2]), "created_at": row[3],
                "strategies": strategies, "members": members}
