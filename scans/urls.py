from django.urls import path, re_path

from scans import views

app_name = "scans"
urlpatterns = [
    path("", views.scan_list, name="list"),
    path("upload/", views.upload, name="upload"),
    path("<int:scan_id>/", views.scan_detail, name="detail"),
    re_path(r"^(?P<scan_id>[0-9]+)/download\.(?P<fmt>md|txt|json)$", views.download, name="download"),
    path("<int:scan_id>/original/", views.original_file, name="original"),
    path("<int:scan_id>/cancel/", views.cancel, name="cancel"),
    path("<int:scan_id>/retry/", views.retry, name="retry"),
    path("<int:scan_id>/delete/", views.delete, name="delete"),
    path("<int:scan_id>/pages/<int:number>/thumb.png", views.page_thumbnail, name="thumbnail"),
    path("<int:scan_id>/pages/<int:number>/text.txt", views.page_text, name="page_text"),
]
