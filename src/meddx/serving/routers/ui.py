"""The clinician's web page (``/``) and the signed heat-map result pages behind card links.

The page is static HTML + a little JS served by the app (no CDN, works offline). It holds no
data itself: the JS calls the REST API with the bearer token the user enters. Result pages
(``/ui/result/{id}?exp=…&sig=…``) need no token: the signed, expiring link is the credential,
and they show only the image and its heat map (or, for an ECG, the trace with its attribution
strip) and the model's answer — no patient identifiers.
"""

from __future__ import annotations

import html
from importlib import resources

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, Response

from meddx.fhir.resources import RESEARCH_NOTICE
from meddx.serving.deps import State, state

__all__ = ["router", "CSP"]

router = APIRouter(tags=["ui"])
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


_CAPTIONS = {"overlay.png": "heat map", "image.png": "input",
             "explanation.png": "explanation (where the model looked)"}


def _static(name: str) -> str:
    return resources.files("meddx.serving").joinpath(f"static/{name}").read_text()


def _banner(show: bool) -> str:
    return f'<div class="research" id="research">{html.escape(RESEARCH_NOTICE)}</div>' \
        if show else ""


def _explanation_line(summary: dict | None) -> str:
    """The explainer's summary in words (ECG: the most important stretch of the record)."""
    if not summary:
        return ""
    if "start_s" in summary:
        text = (f"Most important stretch: {summary['start_s']:.1f}–{summary['end_s']:.1f} s "
                f"(peak at {summary['peak_s']:.1f} s)")
    elif "top_positions" in summary:
        text = "Most important positions: " + ", ".join(
            f"{t['position']} ({t['base']})" for t in summary["top_positions"])
    elif "top_atoms" in summary:
        text = "Most important atoms: " + ", ".join(
            f"{t['symbol']}{t['index']}" for t in summary["top_atoms"])
    else:
        text = ""
    averaged = summary.get("averaged_over")
    if averaged:  # an ensemble or TTA package
        text += ("; " if text else "") + (
            f"the map is the mean over {averaged['members']} ensemble member(s) × "
            f"{averaged['views']} test-time view(s)")
    if not text:
        return ""
    return f'<p id="explanation">{html.escape(text)}</p>'


def _ood_line(summary: dict) -> str:
    """The out-of-distribution warning, when the answer is flagged."""
    if not summary.get("ood"):
        return ""
    return ('<p id="ood" class="ood">Outside what this model was trained on (OOD score '
            f'{float(summary["ood_score"]):.4g}): the model makes no recommendation for this '
            "case.</p>")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index(st: State = Depends(state)) -> HTMLResponse:
    """The upload page."""
    page = _static("index.html").replace("<!--RESEARCH-->", _banner(st.hub.any_research_only))
    return HTMLResponse(page, headers=_HEADERS)


@router.get("/ui/result/{rid}", response_class=HTMLResponse, include_in_schema=False)
def result_page(rid: str, exp: int = Query(...), sig: str = Query(...),
                st: State = Depends(state)) -> HTMLResponse:
    """The heat map behind a CDS card's link (signed, expiring)."""
    st.heatmaps.check(rid, exp, sig)
    stored = st.heatmaps.info(rid)
    info = stored["info"]
    s = info["summary"]
    q = f"exp={exp}&sig={html.escape(sig)}"
    probs = s.get("calibrated") or s.get("probabilities") or {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1%}</td></tr>" for k, v in probs.items())
    images = "".join(
        f'<figure><img id="{n.split(".")[0]}" alt="{n}" src="/ui/result/{rid}/{n}?{q}">'
        f"<figcaption>{_CAPTIONS.get(n, 'input')}</figcaption></figure>"
        for n in sorted(stored["files"]))
    sets = s.get("prediction_set")
    body = _static("result.html").format(
        banner=_banner(bool(info.get("research_only"))),
        model=html.escape(f"{info['model']['name']} {info['model']['version']}"),
        decision="none" if s.get("ood") else html.escape(str(s.get("decision") or s.get("label"))),
        set=html.escape("{" + ", ".join(sets) + "}" if sets is not None else "not available"),
        refer="refer for expert review" if s.get("refer") else "",
        ood=_ood_line(s),
        rows=rows, images=images, explanation=_explanation_line(info.get("explanation")))
    return HTMLResponse(body, headers=_HEADERS)


@router.get("/ui/result/{rid}/{name}", include_in_schema=False)
def result_file(rid: str, name: str, exp: int = Query(...), sig: str = Query(...),
                st: State = Depends(state)) -> Response:
    """A PNG of a result (signed, expiring)."""
    st.heatmaps.check(rid, exp, sig)
    return Response(st.heatmaps.file(rid, name), media_type="image/png", headers=_HEADERS)
