"""The tracking and configuration page (``dts web``): the application (``app``), how it is
served (``server``), its users and roles (``users``), sessions, CSRF and throttling
(``security``), and what a person can do from it (``actions``). docs/web.md."""
