// Keeps the live part of the page (<main id="live">) fresh: every second it
// fetches the same URL with ?partial=1 and swaps the answer in when it
// changed. Without JavaScript the page is the same, as of its load.
(function () {
  var live = document.getElementById("live");
  if (!live || !window.fetch) return;
  var last = null;
  function tick() {
    var u = new URL(window.location.href);
    u.searchParams.set("partial", "1");
    fetch(u, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(String(r.status)); return r.text(); })
      .then(function (t) {
        if (t !== last) { live.innerHTML = t; last = t; }
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { setTimeout(tick, 1000); });
  }
  setTimeout(tick, 1000);
})();
