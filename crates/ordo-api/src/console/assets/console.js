// The console's one script. It reads no data from the page into code: it asks a person to
// confirm an action before its form is sent, and refreshes the parts of a page marked
// `data-live` by fetching the same page again (rendered and escaped on the server) and moving
// that part of it in.
'use strict';

document.addEventListener('submit', (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

for (const live of document.querySelectorAll('[data-live]')) {
  const every = Math.max(Number(live.dataset.live) || 2000, 500);
  // The next refresh is planned when this one has finished: a slow answer never piles up
  // requests on a busy API.
  const refresh = async () => {
    try {
      const response = await fetch(window.location.href, {
        credentials: 'same-origin',
        headers: { Accept: 'text/html' },
      });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), 'text/html');
        const fresh = page.querySelector('[data-live]');
        // A copy of the list first: moving a node out of the fresh page shortens its childNodes.
        if (fresh) live.replaceChildren(...Array.from(fresh.childNodes));
      }
    } catch (_) {
      // Unreachable for a moment: the next refresh tries again.
    }
    setTimeout(refresh, every);
  };
  setTimeout(refresh, every);
}
