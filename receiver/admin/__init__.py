"""The admin listener: what operators and monitoring use, apart from the public port CI
posts to. Loopback by default; a token or Basic credentials otherwise.

`app.create_admin_app` builds it; `auth.AdminAuth` guards every route of it, so a route
added to `app.routes()` (the JSON admin API, the inspector page) is guarded the same way.
"""
