from django.urls import path
from orders import views

urlpatterns = [
    path("orders/", views.place_order, name="place-order"),
    path("orders/<int:order_id>/charge/", views.retry_charge, name="retry-charge"),
]
