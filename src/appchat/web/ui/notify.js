// Telling an agent whose tab is hidden that a customer wrote: a browser notification (once
// they allowed it, on a click of "Enable notifications": never asked on load), a short
// beep if they turned the sound on (kept in localStorage), and the unread count in the
// title (render.js writes it).

import { $ } from "./dom.js";
import { conversationTitle, isStaff, messagePreview } from "./format.js";
import { state } from "./state.js";

const SOUND_KEY = "appchat.sound";
let audio = null; // the AudioContext, made on the first click that turns the sound on
let opener = () => {}; // opens a conversation (app.js hands in conversations.js's)

export function setupNotifications(openConversation) {
  opener = openConversation;
  const sound = $("sound");
  sound.checked = localStorage.getItem(SOUND_KEY) === "on";
  sound.addEventListener("change", () => {
    localStorage.setItem(SOUND_KEY, sound.checked ? "on" : "off");
    if (sound.checked) beep(); // a click: the browser lets the page start its audio now
  });
  $("enable-notifications").addEventListener("click", async () => {
    try {
      await Notification.requestPermission();
    } finally {
      renderNotificationControls();
    }
  });
  renderNotificationControls();
}

// "Enable notifications" while the browser has not been asked; "blocked" once refused.
export function renderNotificationControls() {
  const supported = "Notification" in globalThis;
  const permission = supported ? Notification.permission : "denied";
  $("enable-notifications").hidden = !supported || permission !== "default";
  $("notifications-blocked").hidden = !supported || permission !== "denied";
}

// A message reached the page (a push to a conversation we take part in, or the newest
// message of an inbox update): announce it if a customer wrote it and the tab is hidden.
// Each message once, whichever way it came first.
export function customerWrote(message) {
  if (!state.me.staff || !message || message.sender_id === state.me.sid) return;
  if (isStaff(message.sender_id) || message.private) return;
  if (state.notified.has(message.id)) return;
  state.notified.add(message.id);
  if (state.notified.size > 2000) state.notified.delete(state.notified.values().next().value); // the oldest
  if (document.visibilityState !== "hidden") return;
  if (localStorage.getItem(SOUND_KEY) === "on") beep();
  if ("Notification" in globalThis && Notification.permission === "granted") {
    const channel = message.session_channel;
    const c = state.conversations.get(channel) || { application_id: Number(channel) };
    try {
      const note = new Notification(conversationTitle(c), {
        body: messagePreview(message),
        tag: `appchat-${channel}`, // one per conversation: a newer message replaces it
      });
      note.onclick = () => {
        window.focus();
        opener(channel);
        note.close();
      };
    } catch {
      // a browser that only notifies through a service worker: the title still counts
    }
  }
}

function beep() {
  try {
    audio = audio || new AudioContext();
    if (audio.state === "suspended") audio.resume();
    const now = audio.currentTime;
    const tone = audio.createOscillator();
    const gain = audio.createGain();
    tone.frequency.value = 880;
    gain.gain.setValueAtTime(0.0001, now);
    gain.gain.exponentialRampToValueAtTime(0.2, now + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, now + 0.3);
    tone.connect(gain).connect(audio.destination);
    tone.start(now);
    tone.stop(now + 0.32);
  } catch {
    // no audio on this device
  }
}
