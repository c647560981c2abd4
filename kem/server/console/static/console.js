// kem console: confirmations, and a refresh for pages that watch a running job. No inline scripts (CSP).
document.addEventListener("click", (ev) => {
  const el = ev.target.closest("[data-confirm]");
  if (el && !window.confirm(el.getAttribute("data-confirm"))) ev.preventDefault();
  if (ev.target.closest("[data-back]")) { ev.preventDefault(); history.back(); }
});
document.addEventListener("submit", (ev) => {
  const form = ev.target;
  if (!form.classList.contains("confirm-rollback")) return;
  const version = form.querySelector("[name=version]").value;
  if (!window.confirm("Roll back to " + version + "? Requests are served from it at once.")) ev.preventDefault();
});
const every = Number(document.body.dataset.refresh || 0);
if (every > 0) setTimeout(() => window.location.reload(), every * 1000);
