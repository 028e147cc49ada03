// MathJax 3 configuration: the maths of the Markdown pages (pymdownx.arithmatex in
// generic mode writes \( \) and \[ \]) and of the notebooks' Markdown cells ($...$ and
// $$...$$). Code blocks and notebook outputs (<pre>, <code>) are skipped by default.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};

// Typeset again after Material's instant navigation swaps the page content.
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
