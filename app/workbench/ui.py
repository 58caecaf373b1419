"""Page scaffolding shared by every workbench page: which store, which run(s), downloads, messages.

A page starts with ``page = setup("Experts", "...one-line purpose...")``. That sets the page config,
finds the store (``--db`` after ``streamlit run app/Home.py --``, else ``$MOELENS_DB``, else
``traces/moelens.duckdb``), shows what to do when it is missing or empty (and stops), and renders the run
picker in the sidebar. The chosen run lives in session state (so it follows the user across pages) and in
the URL (``?run=3``) so a view can be shared as a link.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitDuplicateElementKey

from moelens.errors import MoelensError
from moelens.viz import figure_html, finding_of, with_finding
from workbench import data

DEFAULT_DB = Path("traces") / "moelens.duckdb"
RUN_KEY = "moelens_run"
RUN_B_KEY = "moelens_run_b"
DB_KEY = "moelens_db"
#: The sample size every figure and table of the page states unless it names its own ("n = ... tokens ...").
N_KEY = "_moelens_n"

STATUS_TEXT = {
    "complete": "complete",
    "recording": "recording / interrupted",
    "failed": "failed",
    "incomplete": "incomplete (a shard is missing or partial)",
}


def db_from_argv(argv: list[str]) -> str | None:
    """``--db PATH`` or ``--db=PATH`` from the script arguments."""
    for i, a in enumerate(argv):
        if a == "--db" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--db="):
            return a.split("=", 1)[1]
    return None


def resolve_db() -> Path:
    """The store this session browses (session state, then --db, then $MOELENS_DB, then the default)."""
    if st.session_state.get(DB_KEY):
        return Path(st.session_state[DB_KEY])
    found = db_from_argv(sys.argv[1:]) or os.environ.get("MOELENS_DB") or str(DEFAULT_DB)
    p = Path(found).expanduser()
    st.session_state[DB_KEY] = str(p)
    return p


def how_to_record(db: Path) -> None:
    st.markdown("Record a trace first, then reload this page:")
    st.code(
        f"moelens demo --no-app --db {db}        # the bundled demo model over its labelled corpus\n"
        f"moelens record MODEL texts.txt --db {db}   # any supported MoE model over your texts",
        language="bash",
    )
    st.caption("Open another store with: moelens app --db PATH (or streamlit run app/Home.py -- --db PATH)")


def run_label(row: pd.Series | dict) -> str:
    name = row.get("name") or row.get("model") or "run"
    status = row.get("status")
    tail = "" if status == "complete" else f" · {STATUS_TEXT.get(status, status)}"
    return f"#{int(row['run_id'])} · {name}{tail}"


def _int_param(name: str) -> int | None:
    v = st.query_params.get(name)
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


@dataclass
class Page:
    """What a page needs: the store path, all runs, the chosen run (and its row)."""

    db: Path
    runs: pd.DataFrame
    run: int
    info: dict[str, Any]
    run_b: int | None = None
    info_b: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def stamp(self) -> float:
        return data.stamp(self.db)

    @property
    def labels(self) -> list[str]:
        seqs = data.sequences(str(self.db), self.stamp, self.run)
        return sorted(seqs["label"].dropna().astype(str).unique()) if "label" in seqs.columns else []

    @property
    def layer_ids(self) -> list[int]:
        lay = data.layers(str(self.db), self.stamp, self.run)
        return [int(v) for v in lay["layer"]] if len(lay) else []

    @property
    def n_experts(self) -> int:
        per = data.experts_of(str(self.db), self.stamp, self.run)
        return max(per.values()) if per else int(self.info.get("n_experts") or 0)

    @property
    def top_k(self) -> int:
        return int(self.info.get("top_k") or 1)

    def call(self, name: str, *, run: int | None = None, quiet: bool = False, **params: Any) -> Any:
        """Run an analysis for this page's run; on a missing function or a user-facing error show why
        and return None. Unexpected errors are shown with their traceback (and returned as None)."""
        return guarded(name, f"Computing {name} …", lambda: data.analysis(str(self.db), name, self.run if run is None else run,
                                                                          **params), quiet=quiet)

    def call_on(self, name: str, label: str | None, **params: Any) -> Any:
        """`call` over the tokens of one label only (``label=None``: every token): the score streams that label's
        sequences alone (``only_label``), so a label filter costs a pass over that label, never the whole run."""
        if label is None:
            return self.call(name, **params)
        return guarded(name, f"Computing {name} for label {label!r} …",
                       lambda: data.analysis(str(self.db), name, self.run, only_label=label, **params))

    def call_ci(self, name: str, ci: dict[str, int] | None, **params: Any) -> Any:
        """`call`, with a bootstrap interval over sequences (``<value>_lo/_hi`` columns) when ``ci`` is set
        (``{"n_boot": ..., "seed": ...}`` from `ci_controls`)."""
        if ci is None:
            return self.call(name, **params)
        from workbench import queries

        return guarded(name, f"Bootstrapping {name} over sequences ({ci['n_boot']} resamples) …",
                       lambda: queries.bootstrap(str(self.db), self.stamp, name, self.run, ci["n_boot"], ci["seed"], **params))

    def call_pair(self, name: str, run_a: int, run_b: int, **params: Any) -> Any:
        return guarded(name, f"Computing {name} …", lambda: data.analysis_pair(str(self.db), name, run_a, run_b, **params))


def guarded(name: str, spinner: str, compute: Any, *, quiet: bool = False) -> Any:
    """``compute()`` under a spinner; a missing analysis is an info box (unless ``quiet``), a user-facing error a
    warning, anything else an error with its traceback: the page goes on, the result is None. A result that needs
    a pass over more of the run than the pass budget (`data.PassNeeded`) is offered behind a Compute button
    (`offer_pass`) instead."""
    try:
        try:
            with st.spinner(spinner):
                return compute()
        except data.PassNeeded as needed:
            return offer_pass(needed)
    except data.AnalysisUnavailable as exc:
        if not quiet:
            st.info(f"This view needs `moelens.analysis.{name}`: {exc}.")
        return None
    except MoelensError as exc:
        st.warning(str(exc))
        return None
    except Exception as exc:  # noqa: BLE001 - show, don't crash the whole page
        show_error(f"{name} failed", exc)
        return None


def offer_pass(needed: data.PassNeeded) -> Any:
    """One line saying what the pass is and how big, and a Compute button; on click the pass runs with a progress
    bar and a Stop button (Stop reruns the page at once: the pass ends at its next batch and nothing of it is
    shown). The finished result is kept (`data.run_pass`), so later renders show it without a click."""
    slot = st.empty()
    box = slot.container()
    line = box.empty()  # the line goes above its button
    try:
        go = box.button("Compute", key=f"_pass_go_{needed.key}", icon=":material/play_arrow:",
                        help="Run this pass now; the result stays for this run.")
    except StreamlitDuplicateElementKey:  # the same result asked for again further down this page
        line.caption(f"{needed.what}: its Compute button is above.")
        return None
    line.info(f":material/hourglass: {needed}.")
    if not go:
        return None
    box.button("Stop", key=f"_pass_stop_{needed.key}", icon=":material/stop_circle:", help="Stop this pass")
    bar = box.progress(0.0, text=f"{needed.what}: starting …")

    def progress(done: int, total: int) -> None:
        bar.progress(done / max(total, 1), text=f"{needed.what}: batch {done:,} of {total:,}")

    value = data.run_pass(needed, progress)
    slot.empty()
    return value


def ci_controls(key: str, container: Any = None) -> dict[str, int] | None:
    """A toggle for 95% bootstrap intervals over sequences, with its resample count and seed shown;
    ``{"n_boot", "seed"}`` when on, else None."""
    box = container if container is not None else st
    if not box.toggle("95% bootstrap intervals (resampling sequences)", key=f"{key}_ci",
                      help="Percentile intervals over resamples of whole sequences, seeded; recomputes the score "
                           "once per resample."):
        return None
    c1, c2 = box.columns(2)
    n_boot = c1.number_input("n_boot (resamples)", 20, 2000, 200, step=20, key=f"{key}_nboot")
    seed = c2.number_input("seed", 0, 2**31 - 1, 0, key=f"{key}_seed")
    return {"n_boot": int(n_boot), "seed": int(seed)}


def show_error(what: str, exc: BaseException) -> None:
    st.error(f"{what}: {type(exc).__name__}: {exc}")
    with st.expander("Traceback"):
        st.code("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def synced_select(
    label: str,
    options: list,
    *,
    key: str,
    qp: str | None = None,
    default: Any = None,
    format_func=str,
    container: Any = None,
    help: str | None = None,
    cast=int,
) -> Any:
    """A selectbox whose value lives in session state under ``key`` (so it survives page switches) and,
    with ``qp``, in the URL query parameter ``qp`` (deep links such as ``?run=3&seq=12``)."""
    container = container if container is not None else st
    if not options:
        return None
    if qp is not None:
        raw = st.query_params.get(qp)
        if raw not in (None, ""):
            try:
                wanted = cast(raw)
            except (TypeError, ValueError):
                wanted = None
            if wanted in options:
                st.session_state[key] = wanted
            else:  # a bad deep link: say so rather than silently open something else
                if st.session_state.get(key) not in options:
                    st.session_state[key] = default if default in options else options[0]
                st.warning(f"The link asks for {label.lower()} {raw!r} (?{qp}={raw}), which is not here; showing "
                           f"{format_func(st.session_state[key])} instead.")
    if st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else options[0]
    widget = f"_w_{key}"
    st.session_state[widget] = st.session_state[key]

    def changed() -> None:
        st.session_state[key] = st.session_state[widget]
        if qp is not None:
            st.query_params[qp] = str(st.session_state[widget])

    container.selectbox(label, options, key=widget, format_func=format_func, on_change=changed, help=help)
    if qp is not None:
        st.query_params[qp] = str(st.session_state[key])
    return st.session_state[key]


def _pick_run(runs: pd.DataFrame, key: str, qp: str, label: str, default: int | None, help: str) -> int:
    ids = [int(v) for v in runs["run_id"]]
    labels = {int(r["run_id"]): run_label(r) for _, r in runs.iterrows()}
    value = synced_select(
        label, ids, key=key, qp=qp, default=default if default is not None else ids[-1],
        format_func=lambda i: labels.get(i, str(i)), container=st.sidebar, help=help,
    )
    return int(value)


def _plain_complete(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["status"] == "complete") & runs["parent_run_id"].isna()]


def default_run(runs: pd.DataFrame) -> int | None:
    """The largest complete run that is not steered (the newest of equal size), else the newest complete run,
    else the newest run: a steering experiment's short baseline or controls never take over every page."""
    plain = _plain_complete(runs)
    if len(plain):
        biggest = plain[plain["n_tokens"] == plain["n_tokens"].max()]
        return int(biggest["run_id"].iloc[-1])
    done = runs[runs["status"] == "complete"]
    pool = done if len(done) else runs
    return int(pool["run_id"].iloc[-1]) if len(pool) else None


def default_pair(runs: pd.DataFrame, run: int) -> int | None:
    """A run to compare ``run`` with: the steered run of its experiment (not a random control), its parent (the
    baseline), or another complete run of the same tokens and expert count."""
    others = runs[runs["run_id"] != run]
    if others.empty:
        return None
    kids = others[others["parent_run_id"] == run]
    if len(kids):
        steered = kids[kids["name"].fillna("").str.startswith("steered")]
        return int((steered if len(steered) else kids)["run_id"].iloc[-1])
    row = runs[runs["run_id"] == run].iloc[0]
    if pd.notna(row.get("parent_run_id")) and int(row["parent_run_id"]) in set(others["run_id"]):
        return int(row["parent_run_id"])
    same = others[(others["n_tokens"] == row["n_tokens"]) & (others["n_experts"] == row["n_experts"])
                  & (others["status"] == "complete")]
    if len(same):
        return int(same["run_id"].iloc[0])
    return int(others["run_id"].iloc[-1])


def setup(title: str, purpose: str, *, icon: str = "🔬", second_run: bool = False, layout: str = "wide") -> Page:
    """Page config, store checks, run picker(s). Stops the script (with advice) when there is nothing to show."""
    st.set_page_config(page_title=f"{title} · moelens", page_icon=icon, layout=layout)
    db = resolve_db()
    st.title(title)
    st.caption(purpose)
    st.sidebar.markdown(f"**Store** `{db}`")
    if not db.exists():
        st.warning(f"No trace store at `{db}`.")
        how_to_record(db)
        st.stop()
    try:
        runs = data.runs(str(db), data.stamp(db))
    except MoelensError as exc:
        st.error(str(exc))
        st.stop()
    if runs.empty:
        st.info(f"The store `{db}` has no runs yet.")
        how_to_record(db)
        st.stop()
    run = _pick_run(runs, RUN_KEY, "run", "Run", default_run(runs), "The run every page shows (also ?run= in the URL).")
    run_b = None
    if second_run:
        run_b = _pick_run(
            runs, RUN_B_KEY, "run_b", "Compare with", default_pair(runs, run), "The second run (also ?run_b= in the URL)."
        )
    try:
        info = data.run_info(str(db), data.stamp(db), run)
        info_b = data.run_info(str(db), data.stamp(db), run_b) if run_b is not None else None
    except MoelensError as exc:
        st.error(str(exc))
        st.stop()
    status = info.get("status")
    if status != "complete":
        msg = (
            "is still recording, or its recorder stopped without finishing (interrupted); what was written so far is shown."
            if status == "recording"
            else f"failed ({info.get('error') or 'no reason recorded'}); the rows written before the failure are shown."
        )
        st.warning(f"Run #{run} {msg}")
    st.sidebar.caption(run_summary(info))
    row = runs[runs["run_id"] == run].iloc[0]
    st.session_state[N_KEY] = f"n = {int(row['n_tokens']):,} tokens in {int(row['n_sequences']):,} sequences of run #{run}"
    return Page(db=db, runs=runs, run=run, info=info, run_b=run_b, info_b=info_b)


def run_summary(info: dict[str, Any]) -> str:
    parts = [str(info.get("model") or "")]
    if info.get("n_experts"):
        parts.append(f"{info['n_experts']} experts, top-{info.get('top_k')}")
    moe = info.get("moe_layers")
    if moe is not None and len(moe):
        parts.append(f"{len(moe)} MoE layers")
    if info.get("parent_run_id") is not None and not pd.isna(info.get("parent_run_id")):
        parts.append(f"steered from #{int(info['parent_run_id'])}")
    return " · ".join(p for p in parts if p)


def spec_text(spec: Any) -> str:
    """A steering spec in one line (``disable 1:3 · boost 2:5=+2``), or its JSON when it is not a moelens spec."""
    if spec is None or (isinstance(spec, float) and pd.isna(spec)):
        return ""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return spec
    try:
        from moelens.steering.spec import SteeringSpec  # plain data, no torch

        return SteeringSpec.from_dict(spec).describe()
    except Exception:  # noqa: BLE001 - older or foreign specs: show them as they are
        return json.dumps(spec, sort_keys=True)


# -- output helpers ------------------------------------------------------------------------------------


def md_escape(text: str) -> str:
    """Text shown literally in st.markdown (labels and token texts may hold markdown characters)."""
    out = []
    for ch in str(text):
        out.append("\\" + ch if ch in "\\`*_[]<>|~$" else ch)
    text = "".join(out)
    return "\\" + text if text[:1] in ("#", "-", "+") else text


def sample_size(n: str | None = None) -> str:
    """What a figure or table rests on: ``n`` when given, else the page's run (tokens and sequences)."""
    return n or st.session_state.get(N_KEY, "")


def figure(fig, key: str, filename: str, *, select: bool = False, n: str | None = None) -> list[dict]:
    """A plotly figure with its finding and sample size (``n = ...``) as a line of text above it (wraps at
    any width), the modebar's PNG export and an HTML download (self-contained; built on click, with the
    finding and n under the title).

    With ``select`` a click on a bar/point reruns the page and the clicked points are returned (drill-downs).
    """
    import plotly.graph_objects as go

    size = sample_size(n)
    finding = " ".join(t for t in (finding_of(fig), f"({size})" if size else "") if t)
    if finding:
        st.markdown(f":material/lightbulb: {md_escape(finding)}")
        fig = with_finding(fig, finding)
    shown = go.Figure(fig)
    meta = fig.layout.meta if isinstance(fig.layout.meta, dict) else {}
    shown.update_layout(title_subtitle_text="", margin_t=50 + int(meta.get("extra_top", 0)))
    config = {"displaylogo": False, "toImageButtonOptions": {"filename": safe_name(filename), "scale": 2}}
    event = None
    if select:
        event = st.plotly_chart(shown, key=key, config=config, on_select="rerun", selection_mode="points")
    else:
        st.plotly_chart(shown, key=key, config=config)
    st.download_button(
        "Download figure (HTML)",
        data=lambda: figure_html(fig),
        file_name=f"{safe_name(filename)}.html",
        mime="text/html",
        key=f"{key}_html",
        icon=":material/download:",
    )
    try:
        return list(event.selection.points) if event is not None else []
    except AttributeError:
        return []


def link(page_path: str, label: str, query: dict[str, Any], *, icon: str = ":material/arrow_forward:") -> None:
    """A link to another page carrying query parameters (a drill-down); plain text where links cannot render."""
    try:
        st.page_link(page_path, label=label, icon=icon, query_params={k: str(v) for k, v in query.items()})
    except Exception:  # noqa: BLE001 - page links need the multipage runtime (AppTest of a single page)
        st.markdown(f"{md_escape(label)} (open {page_path} with ?" + "&".join(f"{k}={v}" for k, v in query.items()) + ")")


def table(
    df: pd.DataFrame,
    key: str,
    filename: str,
    *,
    height: int | str = "auto",
    column_config: dict | None = None,
    select: bool = False,
    n: str | None = None,
) -> list[int]:
    """A table with its sample size (``n = ...``) and a CSV download of exactly what is shown. With ``select``
    a click on a row reruns the page and the selected row positions are returned (drill-downs)."""
    rows: list[int] = []
    size = sample_size(n)
    st.caption(f"{len(df):,} rows" + (f" · {size}" if size else ""))
    if select:
        event = st.dataframe(df, hide_index=True, key=key, height=height, column_config=column_config,
                             on_select="rerun", selection_mode="single-row")
        try:
            rows = list(event.selection.rows)
        except AttributeError:
            rows = []
    else:
        st.dataframe(df, hide_index=True, key=key, height=height, column_config=column_config)
    st.download_button(
        "Download table (CSV)",
        data=lambda: df.to_csv(index=False).encode("utf-8"),
        file_name=f"{safe_name(filename)}.csv",
        mime="text/csv",
        key=f"{key}_csv",
        icon=":material/download:",
    )
    return rows


def layer_select(page: Page, key: str, label: str = "Layer", default: int | None = None, container=st) -> int | None:
    ids = page.layer_ids
    if not ids:
        st.info("This run has no routed layers recorded.")
        return None
    idx = ids.index(default) if default in ids else 0
    return container.selectbox(label, ids, index=idx, key=key, format_func=lambda v: f"L{v}")


#: Layers a token view's hover lists at most: the chosen layer and its neighbours (the view's HTML grows with them;
#: 48 layers × top-8 of a 512-token sequence is ~2 MB and 1 s to build).
HOVER_LAYERS = 12


def near_layers(routing: pd.DataFrame, layer: int | None, width: int = HOVER_LAYERS) -> tuple[pd.DataFrame, str]:
    """The rows of ``routing`` at the ``width`` layers nearest ``layer`` (all of them when it has no more), and a
    caption saying which layers the hover lists when some are left out."""
    ids = sorted(int(v) for v in routing["layer"].unique()) if len(routing) else []
    if len(ids) <= width or layer is None:
        return routing, ""
    at = ids.index(int(layer)) if int(layer) in ids else 0
    lo = min(max(at - width // 2, 0), len(ids) - width)
    kept = ids[lo : lo + width]
    return (routing[routing["layer"].isin(kept)],
            f"Hover lists layers L{kept[0]}–L{kept[-1]} ({width} of {len(ids)}, around the chosen layer); pick another "
            "layer to move them.")


def slug(page: Page, *parts: Any) -> str:
    """A download's file name: ``moelens_run3_<parts>``, with anything but letters, digits, ``.``, ``-`` and ``_``
    (spaces, slashes, quotes in labels or token texts) turned into ``-``."""
    return safe_name("_".join(["moelens", f"run{page.run}", *[str(p) for p in parts]]))


def safe_name(name: str) -> str:
    """``name`` usable as a file name everywhere: runs of other characters than ``[A-Za-z0-9._-]`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "moelens"
