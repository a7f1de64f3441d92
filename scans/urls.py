from django.urls import path, re_path

from scans import views

app_name = "scans"
page = "<int:scan_id>/pages/<int:number>/"
urlpatterns = [
    path("", views.scan_list, name="list"),
    path("upload/", views.upload, name="upload"),
    path("<int:scan_id>/", views.scan_detail, name="detail"),
    re_path(r"^(?P<scan_id>[0-9]+)/download\.(?P<fmt>md|txt|json)$", views.download, name="download"),
    path("<int:scan_id>/download.pdf", views.download_pdf, name="download_pdf"),
    path("<int:scan_id>/original/", views.original_file, name="original"),
    path("<int:scan_id>/cancel/", views.cancel, name="cancel"),
    path("<int:scan_id>/retry/", views.retry, name="retry"),
    path("<int:scan_id>/delete/", views.delete, name="delete"),
    path(page, views.page_fragment, name="page"),
    path(page + "thumb.png", views.page_image, {"size": "thumb"}, name="thumbnail"),
    path(page + "view.jpg", views.page_image, {"size": "view"}, name="page_view_image"),
    path(page + "zoom.jpg", views.page_image, {"size": "zoom"}, name="page_zoom_image"),
    path(page + "text.txt", views.page_text, name="page_text"),
    path(page + "correction/", views.correct_page, name="correct_page"),
    path(page + "correction/revert/", views.revert_correction, name="revert_correction"),
    path(page + "read-again/", views.read_again, name="read_again"),
]
