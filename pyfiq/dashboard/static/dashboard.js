// Live figures without a full reload: every few seconds, fetch this page again and swap in the
// fresh version of each part marked data-live. A part holding the keyboard focus, a ticked box
// or an opened traceback is left as it is, so refreshing never takes the reader's place away.
(function () {
  "use strict";
  var every = Number(document.body.getAttribute("data-refresh")) * 1000;
  if (!(every > 0) || !window.fetch || !window.DOMParser) return;
  var busy = false;
  function keep(part) {
    return part.contains(document.activeElement) || part.querySelector("input:checked, details[open]") !== null;
  }
  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Pyfiq-Refresh": "1" } })
      .then(function (reply) { return reply.ok ? reply.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (part) {
          var next = part.id && fresh.getElementById(part.id);
          if (next && !keep(part)) part.replaceWith(document.importNode(next, true));
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () { /* the next round tries again */ })
      .then(function () { busy = false; });
  }
  setInterval(refresh, every);
})();
