from django.urls import path

app_name = "vllm_control"
urlpatterns: list = []
