"""`pserver dashboard`: a live web page of the cluster, from the scheduler's status.

``state.py`` turns successive status reports into what the page draws (no I/O), ``app.py`` is the
Starlette app (the page and its JSON, behind the cluster's authentication) and the poller of the
scheduler, ``static/index.html`` the page (plain JS, no build step). docs/observability.md.
"""
