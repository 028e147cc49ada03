// MathJax 3 configuration: the maths of the Markdown pages (pymdownx.arithmatex, generic
// mode, class "arithmatex") and of the notebooks' Markdown cells ($...$ and $$...$$ in
// "jp-MarkdownOutput"); nothing else on a page is scanned.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-MarkdownOutput",
  },
};

// Typeset again after Material's instant navigation swaps the page content.
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
