"""Tools of the Lumen Outfitters customer-service persona (ava.yaml): a small SQLite order store, created with a few
sample orders the first time (in the persona's state folder), refunds in two steps, tickets and hand-overs."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

SAMPLE_ORDERS = [
    # id, customer, item, amount (EUR), status, days since delivery (None: not delivered)
    ("1001", "alice@example.com", "Trail running shoes", 129.00, "delivered", 12),
    ("1002", "bob@example.com", "2-person tent", 249.00, "shipped", None),
    ("1003", "carol@example.com", "Down sleeping bag", 189.50, "delivered", 45),
    ("1004", "alice@example.com", "Headlamp", 35.00, "processing", None),
]
YES = re.compile(r"^\s*(yes|yes please|confirm|i confirm|ok|okay|go ahead)\b", re.I)
RETURN_DAYS = 30


def open_db(state_dir: Path) -> sqlite3.Connection:
    """The order store (created with the sample orders on first use)."""
    path = Path(state_dir) / "shop.sqlite"
    fresh = not path.exists()
    db = sqlite3.connect(path, timeout=30)
    if fresh:
        db.executescript("""
            CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT, item TEXT, amount REAL, status TEXT,
                                 delivered_days_ago INTEGER);
            CREATE TABLE refunds (order_id TEXT PRIMARY KEY, amount REAL, state TEXT, request_id TEXT, at REAL);
            CREATE TABLE tickets (id INTEGER PRIMARY KEY AUTOINCREMENT, user TEXT, kind TEXT, summary TEXT, at REAL);
        """)
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", SAMPLE_ORDERS)
        db.commit()
    return db


def tools(ctx) -> list:
    """The persona's tools for one request (``ctx``: lmforge.agent.persona.PersonaContext)."""

    def lookup_order(order_id: str) -> dict:
        """Look up an order by its number: item, amount, status and delivery.

        Args:
            order_id: The order number, e.g. "1001".
        """
        with open_db(ctx.state_dir) as db:
            row = db.execute("SELECT id, item, amount, status, delivered_days_ago FROM orders WHERE id = ?",
                             (order_id.strip().lstrip("#"),)).fetchone()
            refund = db.execute("SELECT state FROM refunds WHERE order_id = ?", (order_id,)).fetchone()
        if row is None:
            raise LookupError(f"no order {order_id!r}")
        return {"order_id": row[0], "item": row[1], "amount_eur": row[2], "status": row[3],
                "delivered_days_ago": row[4], "refund": refund[0] if refund else None}

    def refund_order(order_id: str) -> dict:
        """Prepare a refund of a delivered order (within the 30-day return window). It does not pay anything yet:
        ask the customer to confirm, then call confirm_refund.

        Args:
            order_id: The order number.
        """
        order = lookup_order(order_id)
        if order["status"] != "delivered":
            raise ValueError(f"order {order_id} is {order['status']}: only delivered orders can be refunded")
        if order["delivered_days_ago"] > RETURN_DAYS:
            raise ValueError(f"order {order_id} was delivered {order['delivered_days_ago']} days ago, outside the "
                             f"{RETURN_DAYS}-day return window")
        if order["refund"] == "done":
            raise ValueError(f"order {order_id} was already refunded")
        with open_db(ctx.state_dir) as db:
            db.execute("INSERT OR REPLACE INTO refunds VALUES (?, ?, 'pending', ?, ?)",
                       (order["order_id"], order["amount_eur"], ctx.request_id, time.time()))
        return {"status": "awaiting_confirmation", "order_id": order["order_id"], "amount_eur": order["amount_eur"],
                "next": "ask the customer to reply 'yes' to confirm this refund"}

    def confirm_refund(order_id: str) -> dict:
        """Carry out a prepared refund, once the customer has replied yes.

        Args:
            order_id: The order number.
        """
        with open_db(ctx.state_dir) as db:
            row = db.execute("SELECT amount, state, request_id FROM refunds WHERE order_id = ?",
                             (order_id.strip().lstrip("#"),)).fetchone()
            if row is None or row[1] != "pending":
                raise ValueError(f"no refund awaiting confirmation for order {order_id}: call refund_order first")
            if row[2] == ctx.request_id or not YES.match(ctx.user_message):
                raise PermissionError("the customer has not confirmed: ask them to reply 'yes' first")
            db.execute("UPDATE refunds SET state = 'done', at = ? WHERE order_id = ?", (time.time(), order_id))
        return {"status": "refunded", "order_id": order_id, "amount_eur": row[0],
                "note": "the money reaches the customer's card within 5 working days"}

    def create_ticket(summary: str) -> dict:
        """Open a support ticket for a problem that needs follow-up.

        Args:
            summary: What the problem is, in one or two sentences.
        """
        with open_db(ctx.state_dir) as db:
            cur = db.execute("INSERT INTO tickets (user, kind, summary, at) VALUES (?, 'ticket', ?, ?)",
                             (ctx.user, summary, time.time()))
        return {"ticket": cur.lastrowid, "status": "open"}

    def handoff_to_human(reason: str) -> dict:
        """Hand the conversation over to a human colleague.

        Args:
            reason: Why a human is needed.
        """
        with open_db(ctx.state_dir) as db:
            cur = db.execute("INSERT INTO tickets (user, kind, summary, at) VALUES (?, 'handoff', ?, ?)",
                             (ctx.user, reason, time.time()))
        return {"handoff": cur.lastrowid, "status": "a colleague will reply by email within one working day"}

    return [lookup_order, refund_order, confirm_refund, create_ticket, handoff_to_human]
