"""The look of a run in a notebook, live (`.moa-tree`, widgets) and finished (`.moa-view`, HTML).

Our own constant CSS (no model text). Every colour and size is a JupyterLab theme variable with a
fallback, so the view follows the light and the dark theme and still reads where the variables do
not exist (nbconvert HTML, other front ends). Shades that must work on both themes (diff marks,
agreement cells) are translucent. Orange text and the step badges use the theme's darker warning
shade (`--jp-warn-color0`), and a badge's digit is the page's own background colour: readable on a
projector in both themes (white on the light theme's orange-700 is not).
"""

CSS = """<style>
.moa-tree, .moa-view { color: var(--jp-ui-font-color1, #1f1f1f);
  font-family: var(--jp-ui-font-family, system-ui, sans-serif);
  font-size: var(--jp-ui-font-size1, 13px); line-height: 1.45; }
.moa-tree .widget-html-content { line-height: 1.45; font-size: inherit; }
.moa-head { font-size: var(--jp-ui-font-size1, 13px); margin: 2px 0 6px; }
.moa-head .moa-run-status { font-weight: 600; }
.moa-head .moa-run-done { color: var(--jp-success-color1, #388e3c); }
.moa-head .moa-run-failed { color: var(--jp-error-color1, #d32f2f); }
.moa-head .moa-run-cancelled { color: var(--jp-warn-color1, #f57c00); }
.moa-answer { border-left: 4px solid var(--jp-brand-color1, #1976d2); padding: 4px 12px 6px;
  margin: 0 0 10px; background: var(--jp-layout-color1, #fff); }
.moa-answer-label { font-size: var(--jp-content-font-size2, 1.2em); font-weight: 600;
  color: var(--jp-brand-color1, #1976d2); margin-right: 0.6em; }
.moa-answer-body { font-family: var(--jp-content-font-family, system-ui, sans-serif);
  font-size: var(--jp-content-font-size1, 14px); color: var(--jp-content-font-color1, #111);
  line-height: var(--jp-content-line-height, 1.6); }
.moa-answer-body p { margin: 0.3em 0 0.6em; }
.moa-figures { font-size: var(--jp-ui-font-size0, 11px); color: var(--jp-ui-font-color2, #616161); }
.moa-error { color: var(--jp-error-color1, #d32f2f); }
.moa-grid { display: flex; flex-wrap: wrap; gap: 8px; margin: 4px 0 8px; }
.moa-card { flex: 1 1 0; min-width: 170px; box-sizing: border-box; padding: 4px 8px 6px;
  border: 1px solid var(--jp-border-color2, #e0e0e0); border-top: 3px solid var(--jp-border-color1, #bdbdbd);
  border-radius: 3px; background: var(--jp-layout-color1, #fff); }
.moa-card.moa-status-streaming { border-top-color: var(--jp-brand-color1, #1976d2); }
.moa-card.moa-status-done { border-top-color: var(--jp-success-color1, #388e3c); }
.moa-card.moa-status-failed { border-top-color: var(--jp-error-color1, #d32f2f); }
.moa-card.moa-status-cancelled { border-top-color: var(--jp-warn-color1, #f57c00); }
.moa-card-head { font-weight: 600; }
.moa-card-text { max-height: 14em; overflow: auto; margin-top: 2px;
  font-family: var(--jp-content-font-family, system-ui, sans-serif); }
.moa-card-text p { margin: 0.2em 0 0.5em; }
.moa-view details { margin: 4px 0; }
.moa-view summary { cursor: pointer; color: var(--jp-ui-font-color1, #1f1f1f); }
.moa-view .moa-section-title { font-weight: 600; }
.moa-diff { font-size: 0.92em; max-height: 12em; overflow: auto; }
.moa-diff ins { background: rgba(46, 160, 67, 0.25); text-decoration: none; }
.moa-diff del { background: rgba(248, 81, 73, 0.25); }
.moa-matrix { border-collapse: collapse; font-size: var(--jp-ui-font-size1, 13px); margin: 2px 0 6px; }
.moa-matrix td, .moa-matrix th { border: 1px solid var(--jp-border-color2, #e0e0e0); padding: 1px 6px;
  text-align: center; font-weight: normal; }
.moa-bar { display: flex; align-items: center; gap: 6px; font-size: var(--jp-ui-font-size1, 13px); }
.moa-bar-label { flex: 0 0 16em; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.moa-bar-track { flex: 0 1 240px; height: 8px; background: var(--jp-layout-color3, #bdbdbd); }
.moa-bar-fill { height: 8px; background: var(--jp-brand-color1, #1976d2); }
.moa-stair-live { font-size: var(--jp-ui-font-size1, 13px); color: var(--jp-warn-color0, #e65100);
  margin: 2px 0; }
.moa-step-mark { display: inline-block; min-width: 1.2em; padding: 0 0.25em; margin: 0 0.15em;
  border-radius: 0.6em; font: 600 0.8em/1.35 var(--jp-ui-font-family, system-ui, sans-serif);
  text-align: center; vertical-align: super; cursor: help;
  color: var(--jp-layout-color0, #fff); background: var(--jp-brand-color1, #1976d2); }
.moa-step-mark.moa-stair-partial { background: var(--jp-warn-color0, #e65100); }
.moa-stair-table .moa-step-mark { font-size: 0.9em; vertical-align: baseline; }
.moa-view table.moa-stair-table { border-collapse: collapse; table-layout: auto; margin: 2px 0 6px;
  font-size: var(--jp-ui-font-size1, 13px); }
.moa-view table.moa-stair-table th, .moa-view table.moa-stair-table td { padding: 3px 8px;
  text-align: left; vertical-align: top; font-weight: normal; line-height: 1.45;
  border: none; border-bottom: 1px solid var(--jp-border-color2, #e0e0e0); }
.moa-view table.moa-stair-table th { font-weight: 600; }
.moa-stair-table tbody tr:nth-child(even) { background: rgba(127, 127, 127, 0.09); }
.moa-stair-seen { display: flex; align-items: center; gap: 6px; white-space: nowrap; }
.moa-stair-track { display: inline-block; width: 64px; height: 8px; background: var(--jp-layout-color3, #bdbdbd); }
.moa-stair-fill { display: block; height: 8px; }
.moa-stair-fill.moa-stair-whole { background: var(--jp-brand-color1, #1976d2); }
.moa-stair-fill.moa-stair-partial { background: var(--jp-warn-color1, #e65100); }
.moa-stair-chunk { white-space: pre-wrap; max-height: 6em; overflow: auto; min-width: 16em;
  font-family: var(--jp-content-font-family, system-ui, sans-serif); }
.moa-prompt pre { white-space: pre-wrap; max-height: 16em; overflow: auto;
  background: var(--jp-layout-color2, #eee); color: var(--jp-content-font-color1, #111); padding: 6px; }
.moa-tree .jupyter-widget-Collapse-contents { padding: 4px 6px 6px; }
.moa-tree .jupyter-widget-Collapse-header { padding: 3px 8px; }
</style>"""
