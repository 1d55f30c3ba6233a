// Small DOM helpers, and the banner over the page.

export const $ = (id) => document.getElementById(id);

export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Make parent's children `nodes` (each with data-key and data-sig), keeping every child
// whose key and sig are unchanged where it is: the list is an aria-live region, and a
// screen reader should hear the new messages, not the whole thread again.
export function patchChildren(parent, nodes) {
  const old = new Map([...parent.children].map((n) => [n.dataset.key, n]));
  const wanted = nodes.map((n) => {
    const kept = old.get(n.dataset.key);
    return kept && kept.dataset.sig === n.dataset.sig ? kept : n;
  });
  const keep = new Set(wanted);
  for (const n of [...parent.children]) if (!keep.has(n)) n.remove();
  let cursor = parent.firstElementChild;
  for (const n of wanted) {
    if (n === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(n, cursor);
  }
}

export function showBanner(text, action, onAction) {
  const banner = $("banner");
  banner.textContent = text;
  if (action) {
    const button = el("button", "", action);
    button.type = "button";
    button.addEventListener("click", onAction);
    banner.append(button);
  }
  banner.hidden = false;
}

export function hideBanner() {
  $("banner").hidden = true;
}

// An error that only says the connection is down: what failed is done again once online.
export function isOffline(err) {
  return ["offline", "disconnected"].includes(err?.code);
}
